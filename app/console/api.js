// Talking to the service: tokens, fetch wrapper, errors in the service's shape.

const KEYS = { api: "maskrcnn.apiToken", admin: "maskrcnn.adminToken" };

// Read live from sessionStorage: typed once per tab, shared by every page.
export const tokens = {
  get api() {
    return sessionStorage.getItem(KEYS.api) || "";
  },
  get admin() {
    return sessionStorage.getItem(KEYS.admin) || "";
  },
};

// Whether inference routes answer without a token (learned from openapi.json).
let inferenceOpen = false;

export function saveTokens(api, admin) {
  sessionStorage.setItem(KEYS.api, api.trim());
  sessionStorage.setItem(KEYS.admin, admin.trim());
  document.dispatchEvent(new CustomEvent("maskrcnn:tokens"));
}

export const hasAdmin = () => tokens.admin !== "";

/** True when an inference request (segment, models) can be sent without a 401. */
export const canInfer = () => inferenceOpen || tokens.api !== "" || tokens.admin !== "";

/** What to tell the user when `canInfer()` is false. */
export const NEEDS_API_TOKEN = "This server needs the API token: type it above and save.";

/**
 * The Authorization header for a route that takes the `api` or `admin` token.
 * Inference routes get the API token, or the admin token when no API token was
 * typed (the server accepts it there too).
 */
export function authHeaders(kind = "api") {
  const token = kind === "admin" ? tokens.admin : tokens.api || tokens.admin;
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** An error answered by the service (or a network failure: status 0). */
export class ApiError extends Error {
  constructor(status, code, message, requestId = "") {
    super(message);
    this.status = status;
    this.code = code;
    this.requestId = requestId;
  }
  toString() {
    const id = this.requestId ? `, request ${this.requestId}` : "";
    return this.status ? `${this.message} (${this.status} ${this.code}${id})` : this.message;
  }
}

/** Turn a non-OK response body into an ApiError. */
export function errorFrom(status, text, requestId = "") {
  try {
    const e = JSON.parse(text).error;
    if (e && e.code) return new ApiError(status, e.code, e.message || e.code, e.request_id || requestId);
  } catch {
    /* not JSON */
  }
  return new ApiError(status, "http_error", `HTTP ${status}${text ? ": " + text.slice(0, 200) : ""}`, requestId);
}

/**
 * fetch() a relative API path. Options: method, auth ("api" | "admin" | "none"),
 * json (a body sent as JSON), form (FormData), signal, as ("json" | "blob" | "response").
 */
export async function api(path, { method, auth = "api", json, form, signal, as = "json", headers = {} } = {}) {
  const init = { method: method || (json || form ? "POST" : "GET"), signal, headers: { ...headers } };
  if (auth !== "none") Object.assign(init.headers, authHeaders(auth));
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `network error: ${err.message}`);
  }
  if (!response.ok) {
    throw errorFrom(response.status, await response.text(), response.headers.get("X-Request-ID") || "");
  }
  if (as === "response") return response;
  if (as === "blob") return response.blob();
  if (response.status === 204) return null;
  return response.json();
}

/** POST a FormData with XMLHttpRequest, reporting upload progress (0..1). */
export function uploadWithProgress(path, form, { auth = "admin", onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders(auth))) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable && onProgress) onProgress(e.loaded / e.total);
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch {
          resolve(null);
        }
      } else {
        reject(errorFrom(xhr.status, xhr.responseText, xhr.getResponseHeader("X-Request-ID") || ""));
      }
    };
    xhr.onerror = () => reject(new ApiError(0, "network", "network error during upload"));
    xhr.send(form);
  });
}

/** Learn from the OpenAPI document whether inference needs a token. */
export async function probeServer() {
  try {
    const doc = await api("openapi.json"); // the API token where PROTECT_DOCS wants one
    const op = doc.paths?.["/v1/models"]?.get;
    inferenceOpen = !!op && !(op.security && op.security.length);
  } catch {
    inferenceOpen = false;
  }
}

// -- models, shared by every page -------------------------------------------

let modelsCache = null;

/** GET v1/models (cached until `force` or a change event). Empty when it cannot be asked. */
export async function getModels(force = false) {
  if (!canInfer()) return [];
  if (!modelsCache || force) {
    const request = api("v1/models?limit=1000").then((r) => r.data);
    modelsCache = request;
    // a failure is not cached (unless a newer request replaced it already)
    request.catch(() => modelsCache === request && (modelsCache = null));
  }
  return modelsCache;
}

// -- segmentation, shared by the segment and compare pages --------------------------

// The server is asked once with a low threshold; the score sliders filter in the page.
export const REQUEST_SCORE_THRESHOLD = 0.05;

/** The options every console segment request sends (form fields or JSON keys). */
function segmentOptions({ maskThreshold = 0.5, model = "" }) {
  const options = {
    score_threshold: REQUEST_SCORE_THRESHOLD,
    mask_threshold: maskThreshold,
    mask_format: "rle",
    max_detections: 100,
  };
  if (model) options.model = model; // empty: the active model
  return options;
}

/** POST v1/segment: `files` ([{blob, name}]) with the console's options. */
export function segmentFiles(files, options = {}) {
  const form = new FormData();
  for (const { blob, name } of files) form.append("images", blob, name);
  for (const [key, value] of Object.entries(segmentOptions(options))) form.append(key, String(value));
  return api("v1/segment", { form });
}

/** POST v1/segment/json: one image the server fetches from `url`. */
export function segmentUrl(url, options = {}) {
  return api("v1/segment/json", { json: { images: [{ url }], ...segmentOptions(options) } });
}

/** Tell every page that the models changed (activation, new version). */
export function modelsChanged() {
  modelsCache = null;
  document.dispatchEvent(new CustomEvent("maskrcnn:models"));
}
