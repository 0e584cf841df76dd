// The segment page: upload or URL images, draw their detections, filter them in the page.

import { NEEDS_API_TOKEN, REQUEST_SCORE_THRESHOLD, canInfer, getModels, segmentFiles, segmentUrl } from "./api.js";
import {
  canvasPoint, detectionAt, drawDetections, formatBox, formatTiming, loadImage, maskArea, swatch, withScoreAtLeast,
} from "./draw.js";
import { $, download, el, fillModelSelect, setStatus } from "./ui.js";

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
const thumbs = $("#segment-images");
const jsonButton = $("#download-json");
const pngButton = $("#download-png");
const emptyHint = $("#segment-empty");

const HOVER_HINT = "Hover a detection or a row to see it.";

const state = {
  source: null, // {kind: "files", files} | {kind: "url", url}: what to (re-)send
  images: [], // per input image: {name, img (HTMLImageElement or null)}; img.src is an object URL
  response: null,
  current: 0, // index of the image shown
  hidden: new Set(), // class names unchecked in the filter
  hover: null, // detection under the mouse (row or canvas)
  pinned: null, // detection clicked on
  pick: 0, // bumped by each new input: images still loading for an older one are dropped
  seq: 0, // bumped by each request (and new input): only the latest answer is shown
};

/** The detections of the shown image that pass the score slider and the class filter. */
export function visibleDetections() {
  const result = state.response?.results?.[state.current];
  if (!result) return [];
  return withScoreAtLeast(result.detections, Number(scoreSlider.value)).filter((d) => !state.hidden.has(d.class_name));
}

export const lastResponse = () => state.response;

// -- input and requests ------------------------------------------------------------

/** Forget the current input (revoking its object URLs) and clear what shows it. */
function clearInput() {
  for (const im of state.images) if (im.img) URL.revokeObjectURL(im.img.src);
  Object.assign(state, { source: null, images: [], response: null, current: 0, hover: null, pinned: null });
  state.hidden.clear();
  state.seq++; // an answer still on its way is for the old input
  emptyHint.hidden = true; // the canvas is for this input now, drawn or not
  urlButton.disabled = false;
  tbody.replaceChildren();
  thumbs.replaceChildren();
  renderClassFilter();
  showInfo(null);
  jsonButton.disabled = pngButton.disabled = true;
}

async function send() {
  if (!state.source) return;
  if (!canInfer()) {
    setStatus(status, NEEDS_API_TOKEN, "error");
    page.dataset.state = "error";
    return;
  }
  const seq = ++state.seq;
  const options = { maskThreshold: Number(maskSlider.value), model: modelSelect.value };
  const source = state.source;
  page.dataset.state = "loading";
  urlButton.disabled = true;
  setStatus(status, "segmenting…");
  try {
    const response =
      source.kind === "files"
        ? await segmentFiles(source.files.map((f) => ({ blob: f, name: f.name })), options)
        : await segmentUrl(source.url, options);
    if (seq !== state.seq) return; // a newer request or input came meanwhile
    state.response = response;
    state.hover = state.pinned = null;
    if (state.current >= response.results.length) state.current = 0;
    $("#segment-model-id").textContent = response.model?.id ?? "–";
    $("#timing").textContent = formatTiming(response.timing_ms);
    const count = response.results.reduce((n, r) => n + r.detections.length, 0);
    setStatus(status, `${response.results.length} image(s), ${count} detection(s) at score ≥ ${REQUEST_SCORE_THRESHOLD}`);
    renderThumbs();
    renderClassFilter();
    show();
    page.dataset.state = "done";
  } catch (err) {
    if (seq !== state.seq) return;
    setStatus(status, String(err), "error");
    page.dataset.state = "error";
  } finally {
    if (seq === state.seq) urlButton.disabled = false;
  }
}

/** An image the browser can read, or {img: null} (the server may still read it: drawn on grey). */
async function readImage(file) {
  try {
    return { name: file.name, img: await loadImage(file) };
  } catch {
    return { name: file.name, img: null };
  }
}

async function useFiles(files) {
  files = [...files].filter((f) => !f.type || f.type.startsWith("image/"));
  if (!files.length) {
    setStatus(status, "Choose image files (JPEG, PNG, WebP or BMP).", "error");
    return;
  }
  const pick = ++state.pick;
  clearInput();
  page.dataset.state = "loading"; // at once: the images are read before they are sent
  setStatus(status, "segmenting…");
  const images = await Promise.all(files.map(readImage));
  if (pick !== state.pick) {
    // another input was chosen while these loaded
    for (const im of images) if (im.img) URL.revokeObjectURL(im.img.src);
    return;
  }
  state.source = { kind: "files", files };
  state.images = images;
  renderThumbs();
  await send();
}

function useUrl() {
  const url = urlInput.value.trim();
  if (!url) {
    setStatus(status, "Type an http(s) image URL first.", "error");
    return;
  }
  state.pick++;
  clearInput();
  // the page may not load other hosts' images (CSP): the server fetches it, we draw on grey
  state.source = { kind: "url", url };
  state.images = [{ name: url, img: null }];
  send();
}

// -- rendering -----------------------------------------------------------------

function renderThumbs() {
  thumbs.replaceChildren();
  if (state.images.length < 2) return;
  state.images.forEach((im, i) => {
    const count = state.response?.results?.[i]?.detections.length;
    const label = `${im.name}${count === undefined ? "" : ` (${count})`}`;
    const content = im.img ? el("img", { src: im.img.src, alt: label }) : el("span", {}, label);
    const button = el("button", { type: "button", title: label, dataset: { index: i } }, content);
    button.setAttribute("aria-pressed", String(i === state.current));
    button.addEventListener("click", () => {
      state.current = i;
      state.hover = state.pinned = null;
      for (const b of thumbs.children) b.setAttribute("aria-pressed", String(b === button));
      show();
    });
    thumbs.append(button);
  });
}

function renderClassFilter() {
  const byName = new Map(); // class name -> one of its detections (for its colour)
  for (const r of state.response?.results ?? []) for (const d of r.detections) byName.set(d.class_name, d);
  classFilter.replaceChildren(el("legend", {}, "Classes"));
  if (!byName.size) classFilter.append(el("span", { className: "muted" }, state.response ? "no detections" : "none yet"));
  for (const [name, det] of [...byName].sort((a, b) => a[0].localeCompare(b[0]))) {
    const box = el("input", { type: "checkbox", checked: !state.hidden.has(name), dataset: { class: name } });
    box.addEventListener("change", () => {
      if (box.checked) state.hidden.delete(name);
      else state.hidden.add(name);
      show();
    });
    classFilter.append(el("label", {}, box, swatch(det), name));
  }
}

function detectionRow(det, index) {
  const row = el(
    "tr",
    { dataset: { index } },
    el("td", {}, index),
    el("td", {}, swatch(det), det.class_name),
    el("td", {}, det.score.toFixed(2)),
    el("td", {}, formatBox(det.box)),
    el("td", {}, maskArea(det) ?? "–"),
  );
  row.addEventListener("mouseenter", () => setHover(det));
  row.addEventListener("mouseleave", () => setHover(null));
  row.addEventListener("click", () => setPinned(state.pinned === det ? null : det));
  return row;
}

/** Draw the shown image with its visible detections and fill the table. */
function show() {
  const result = state.response?.results?.[state.current];
  if (!result || !state.images[state.current]) return;
  const dets = visibleDetections();
  if (state.pinned && !dets.includes(state.pinned)) state.pinned = null;
  if (state.hover && !dets.includes(state.hover)) state.hover = null;
  draw(dets);
  tbody.replaceChildren(...dets.map((d) => detectionRow(d, result.detections.indexOf(d))));
  markRows();
  jsonButton.disabled = pngButton.disabled = false;
}

function draw(dets = visibleDetections()) {
  const result = state.response.results[state.current];
  const highlight = state.hover ?? state.pinned;
  drawDetections(canvas, state.images[state.current].img, dets, { size: result, highlight });
  canvas.dataset.image = String(state.current);
  showInfo(highlight);
}

function showInfo(det) {
  info.classList.toggle("muted", !det);
  info.textContent = det
    ? `${det.class_name} · score ${det.score.toFixed(2)} · box ${formatBox(det.box)} · mask area ${maskArea(det) ?? "–"} px`
    : HOVER_HINT;
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
    setStatus(status, `models: ${err}`, "error", { sticky: true });
  }
}

// -- wiring --------------------------------------------------------------------

function downloadPng() {
  const base = (state.images[state.current]?.name || "image").replace(/\.[^./]*$/, "").replace(/[^\w.-]+/g, "_");
  canvas.toBlob((blob) => blob && download(blob, `${base.slice(0, 80)}-segmented.png`), "image/png");
}

function downloadJson() {
  download(new Blob([JSON.stringify(state.response, null, 2)], { type: "application/json" }), "segmentation.json");
}

function initDrop() {
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
}

function initCanvas() {
  const under = (e) => {
    const p = canvasPoint(canvas, e);
    return detectionAt(visibleDetections(), p.x, p.y);
  };
  canvas.addEventListener("mousemove", (e) => state.response && setHover(under(e)));
  canvas.addEventListener("mouseleave", () => state.response && setHover(null));
  canvas.addEventListener("click", (e) => {
    if (!state.response) return;
    const det = under(e);
    setPinned(det === state.pinned ? null : det);
  });
}

export function init() {
  fileInput.addEventListener("change", () => {
    const files = [...fileInput.files];
    fileInput.value = ""; // so choosing the same file again sends it again
    if (files.length) useFiles(files);
  });
  initDrop();
  urlButton.addEventListener("click", useUrl);
  urlInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !urlButton.disabled) useUrl();
  });

  scoreSlider.addEventListener("input", () => {
    $("#score-threshold-value").textContent = Number(scoreSlider.value).toFixed(2);
    if (state.response) show();
  });
  maskSlider.addEventListener("input", () => {
    $("#mask-threshold-value").textContent = Number(maskSlider.value).toFixed(2);
  });
  // masks are binarised by the server, and the chosen model runs there: both re-send
  maskSlider.addEventListener("change", send);
  modelSelect.addEventListener("change", send);

  initCanvas();
  jsonButton.addEventListener("click", () => state.response && downloadJson());
  pngButton.addEventListener("click", () => state.response && downloadPng());
}
