// The segment page: upload or URL images, draw their detections, filter them client-side.

import { api, getModels } from "./api.js";
import {
  canvasPoint, classColor, detectionAt, drawDetections, formatBox, formatTiming, loadImage, maskArea,
} from "./draw.js";
import { $, download, el, fillModelSelect, setStatus } from "./ui.js";

// The server is asked once with a low threshold; the slider filters client-side.
const REQUEST_SCORE_THRESHOLD = 0.05;

const page = $("#page-segment");
const canvas = $("#segment-canvas");
const fileInput = $("#segment-files");
const drop = $("#segment-drop");
const urlInput = $("#segment-url");
const urlButton = $("#segment-url-go");
const modelSelect = $("#segment-model");
const scoreSlider = $("#score-threshold");
const maskSlider = $("#mask-threshold");
const classFilter = $("#class-filter");
const status = $("#segment-status");
const tbody = $("#detections tbody");
const info = $("#detection-info");

const state = {
  source: null, // {kind: "files", files} | {kind: "url", url}: what to (re-)send
  images: [], // per input image: {name, img (HTMLImageElement or null), thumb (object URL or null)}
  response: null,
  current: 0,
  hidden: new Set(), // class names unchecked in the filter
  hover: null, // detection under the mouse (row or canvas)
  pinned: null, // detection clicked on the canvas
  seq: 0, // only the latest request's answer is shown
};

/** The detections of the shown image that pass the score slider and the class filter. */
export function visibleDetections() {
  const result = state.response?.results?.[state.current];
  if (!result) return [];
  const min = Number(scoreSlider.value);
  return result.detections.filter((d) => d.score >= min && !state.hidden.has(d.class_name));
}

export const lastResponse = () => state.response;

// -- requests ------------------------------------------------------------------

function options() {
  return {
    score_threshold: REQUEST_SCORE_THRESHOLD,
    mask_threshold: Number(maskSlider.value),
    mask_format: "rle",
    max_detections: 100,
  };
}

async function send() {
  if (!state.source) return;
  const seq = ++state.seq;
  const opts = options();
  const model = modelSelect.value;
  page.dataset.state = "loading";
  urlButton.disabled = true;
  setStatus(status, "segmenting…");
  try {
    let response;
    if (state.source.kind === "files") {
      const form = new FormData();
      for (const file of state.source.files) form.append("images", file, file.name);
      for (const [k, v] of Object.entries(opts)) form.append(k, String(v));
      if (model) form.append("model", model);
      response = await api("v1/segment", { form });
    } else {
      const body = { images: [{ url: state.source.url }], ...opts };
      if (model) body.model = model;
      response = await api("v1/segment/json", { json: body });
    }
    if (seq !== state.seq) return; // a newer request was sent meanwhile
    state.response = response;
    state.hover = state.pinned = null;
    if (state.current >= response.results.length) state.current = 0;
    $("#segment-model-id").textContent = response.model?.id ?? "–";
    $("#timing").textContent = formatTiming(response.timing_ms);
    const count = response.results.reduce((n, r) => n + r.detections.length, 0);
    setStatus(status, `${response.results.length} image(s), ${count} detection(s) at score ≥ ${REQUEST_SCORE_THRESHOLD}`);
    renderAll();
    page.dataset.state = "done";
  } catch (err) {
    if (seq !== state.seq) return;
    setStatus(status, String(err), "error");
    page.dataset.state = "error";
  } finally {
    if (seq === state.seq) urlButton.disabled = false;
  }
}

async function useFiles(files) {
  files = [...files].filter((f) => !f.type || f.type.startsWith("image/"));
  if (!files.length) return;
  page.dataset.state = "loading"; // at once: the images are read before they are sent
  setStatus(status, "segmenting…");
  for (const im of state.images) if (im.thumb) URL.revokeObjectURL(im.thumb);
  state.source = { kind: "files", files };
  state.hidden.clear();
  state.current = 0;
  state.response = null;
  state.images = await Promise.all(
    files.map(async (file) => {
      try {
        const img = await loadImage(file);
        return { name: file.name, img, thumb: img.src };
      } catch {
        return { name: file.name, img: null, thumb: null }; // the server may still read it
      }
    }),
  );
  renderThumbs();
  await send();
}

function useUrl() {
  const url = urlInput.value.trim();
  if (!url) {
    setStatus(status, "Type an http(s) image URL first.", "error");
    return;
  }
  for (const im of state.images) if (im.thumb) URL.revokeObjectURL(im.thumb);
  // the page may not load other hosts' images (CSP): the server fetches it, we draw on grey
  state.source = { kind: "url", url };
  state.images = [{ name: url, img: null, thumb: null }];
  state.hidden.clear();
  state.current = 0;
  state.response = null;
  renderThumbs();
  send();
}

// -- rendering -----------------------------------------------------------------

function renderAll() {
  renderThumbs();
  renderClassFilter();
  show();
}

function renderThumbs() {
  const box = $("#segment-images");
  box.replaceChildren();
  if (state.images.length < 2) return;
  state.images.forEach((im, i) => {
    const count = state.response?.results?.[i]?.detections.length;
    const label = `${im.name}${count === undefined ? "" : ` (${count})`}`;
    const content = im.thumb ? el("img", { src: im.thumb, alt: label }) : el("span", {}, im.name);
    const button = el("button", { type: "button", title: label, dataset: { index: i } }, content);
    button.setAttribute("aria-pressed", String(i === state.current));
    button.addEventListener("click", () => {
      state.current = i;
      state.hover = state.pinned = null;
      for (const b of box.children) b.setAttribute("aria-pressed", String(b === button));
      show();
    });
    box.append(button);
  });
}

function renderClassFilter() {
  const names = new Map();
  for (const r of state.response?.results ?? []) for (const d of r.detections) names.set(d.class_name, d);
  classFilter.replaceChildren(el("legend", {}, "Classes"));
  if (!names.size) classFilter.append(el("span", { className: "muted" }, "no detections"));
  for (const [name, det] of [...names].sort((a, b) => a[0].localeCompare(b[0]))) {
    const box = el("input", { type: "checkbox", checked: !state.hidden.has(name), dataset: { class: name } });
    box.addEventListener("change", () => {
      if (box.checked) state.hidden.delete(name);
      else state.hidden.add(name);
      show();
    });
    const swatch = el("span", { className: "swatch" });
    swatch.style.background = `rgb(${classColor(det).join(",")})`;
    classFilter.append(el("label", {}, box, swatch, name));
  }
}

/** Draw the shown image with its visible detections and fill the table. */
function show() {
  const result = state.response?.results?.[state.current];
  const image = state.images[state.current];
  if (!result || !image) return;
  const dets = visibleDetections();
  if (state.pinned && !dets.includes(state.pinned)) state.pinned = null;
  if (state.hover && !dets.includes(state.hover)) state.hover = null;
  draw(dets);
  const all = result.detections;
  tbody.replaceChildren(
    ...dets.map((d) => {
      const swatch = el("span", { className: "swatch" });
      swatch.style.background = `rgb(${classColor(d).join(",")})`;
      const area = maskArea(d);
      const row = el(
        "tr",
        { dataset: { index: all.indexOf(d) } },
        el("td", {}, all.indexOf(d)),
        el("td", {}, swatch, d.class_name),
        el("td", {}, d.score.toFixed(2)),
        el("td", {}, formatBox(d.box)),
        el("td", {}, area ?? "–"),
      );
      row.addEventListener("mouseenter", () => setHover(d));
      row.addEventListener("mouseleave", () => setHover(null));
      row.addEventListener("click", () => setPinned(state.pinned === d ? null : d));
      return row;
    }),
  );
  markRows();
  $("#download-json").disabled = false;
  $("#download-png").disabled = false;
}

function draw(dets = visibleDetections()) {
  const result = state.response.results[state.current];
  const image = state.images[state.current];
  const highlight = state.hover ?? state.pinned;
  drawDetections(canvas, image.img, dets, { size: result, highlight });
  canvas.dataset.image = String(state.current);
  showInfo(highlight);
}

function showInfo(det) {
  if (!det) {
    info.textContent = "Hover a detection or a row to see it.";
    info.classList.add("muted");
    return;
  }
  info.classList.remove("muted");
  info.textContent = `${det.class_name} · score ${det.score.toFixed(2)} · box ${formatBox(det.box)} · mask area ${maskArea(det) ?? "–"} px`;
}

function markRows() {
  const highlight = state.hover ?? state.pinned;
  const all = state.response?.results?.[state.current]?.detections ?? [];
  for (const row of tbody.rows) row.classList.toggle("highlight", all[row.dataset.index] === highlight);
}

function setHover(det) {
  if (state.hover === det) return;
  state.hover = det;
  draw();
  markRows();
}

function setPinned(det) {
  state.pinned = det;
  draw();
  markRows();
}

// -- models --------------------------------------------------------------------

export async function refreshModels() {
  try {
    fillModelSelect(modelSelect, await getModels(), { activeOption: "active model" });
  } catch (err) {
    setStatus(status, `models: ${err}`, "error");
  }
}

// -- wiring --------------------------------------------------------------------

export function init() {
  fileInput.addEventListener("change", () => {
    const files = [...fileInput.files];
    fileInput.value = ""; // so choosing the same file again sends it again
    useFiles(files);
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFiles(e.dataTransfer.files);
  });
  // a file dropped next to the zone must not navigate away from the console
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  urlButton.addEventListener("click", useUrl);
  urlInput.addEventListener("keydown", (e) => e.key === "Enter" && useUrl());

  scoreSlider.addEventListener("input", () => {
    $("#score-threshold-value").textContent = Number(scoreSlider.value).toFixed(2);
    if (state.response) show();
  });
  maskSlider.addEventListener("input", () => {
    $("#mask-threshold-value").textContent = Number(maskSlider.value).toFixed(2);
  });
  maskSlider.addEventListener("change", () => send());

  canvas.addEventListener("mousemove", (e) => {
    if (!state.response) return;
    const p = canvasPoint(canvas, e);
    setHover(detectionAt(visibleDetections(), p.x, p.y));
  });
  canvas.addEventListener("mouseleave", () => state.response && setHover(null));
  canvas.addEventListener("click", (e) => {
    if (!state.response) return;
    const p = canvasPoint(canvas, e);
    const det = detectionAt(visibleDetections(), p.x, p.y);
    setPinned(det === state.pinned ? null : det);
  });

  $("#download-json").addEventListener("click", () => {
    if (!state.response) return;
    const blob = new Blob([JSON.stringify(state.response, null, 2)], { type: "application/json" });
    download(blob, "segmentation.json");
  });
  $("#download-png").addEventListener("click", () => {
    if (!state.response) return;
    const base = (state.images[state.current]?.name || "image").replace(/\.[^.\/]*$/, "").replace(/[^\w.-]+/g, "_");
    canvas.toBlob((blob) => blob && download(blob, `${base.slice(0, 80)}-segmented.png`), "image/png");
  });
}
