// The compare page: one image, two models, side by side.

import { NEEDS_API_TOKEN, canInfer, getModels, segmentFiles } from "./api.js";
import { drawDetections, formatTiming, loadImage, withScoreAtLeast } from "./draw.js";
import { $, fillModelSelect, setStatus } from "./ui.js";

const page = $("#page-compare");
const leftSelect = $("#compare-left");
const rightSelect = $("#compare-right");
const fileInput = $("#compare-file");
const runButton = $("#compare-run");
const slider = $("#compare-score-threshold");
const status = $("#compare-status");

const SIDES = ["left", "right"];
const sides = Object.fromEntries(
  SIDES.map((side) => [
    side,
    {
      canvas: $(`#compare-canvas-${side}`),
      model: $(`#compare-${side}-model`),
      timing: $(`#compare-${side}-timing`),
      result: null, // its image result: {width, height, detections}
    },
  ]),
);

const state = {
  blob: null, // the image to send: the chosen file, or one handed over by the train page
  name: "image",
  image: null, // a promise of its HTMLImageElement (object URL), or of null when the browser cannot read it
  seq: 0, // bumped by each run and each new image: only the latest answers are shown
};

/** Fill both model choosers. left/right: a model id to select ("active": the active one). */
export async function refreshModels({ left = null, right = null, force = false } = {}) {
  if (!canInfer()) {
    setStatus(status, NEEDS_API_TOKEN);
    return;
  }
  try {
    const models = await getModels(force);
    const active = models.find((m) => m.active)?.id ?? null;
    const other = models.find((m) => !m.active)?.id ?? active;
    const wantLeft = left === "active" ? active : left;
    fillModelSelect(leftSelect, models, { preferred: wantLeft ?? (leftSelect.value || active) });
    fillModelSelect(rightSelect, models, { preferred: right ?? (rightSelect.value || other) });
    if (status.textContent === NEEDS_API_TOKEN) setStatus(status, "");
  } catch (err) {
    setStatus(status, `models: ${err}`, "error", { sticky: true });
  }
}

function drawSide(side, img) {
  const s = sides[side];
  if (!s.result) return;
  const dets = withScoreAtLeast(s.result.detections, Number(slider.value));
  drawDetections(s.canvas, img, dets, { size: s.result, maxVh: 65 });
}

async function redraw() {
  const img = await state.image;
  for (const side of SIDES) drawSide(side, img);
}

/** Show one side's answer (or its failure); returns an error line or null. */
function showAnswer(side, answer, picked) {
  const s = sides[side];
  if (answer.status === "fulfilled") {
    s.result = answer.value.results[0];
    s.model.textContent = answer.value.model.id;
    s.timing.textContent = formatTiming(answer.value.timing_ms);
    return null;
  }
  s.result = null;
  s.model.textContent = picked || "–";
  s.timing.textContent = "";
  return `${side}: ${answer.reason}`;
}

export async function run() {
  if (!state.blob) {
    setStatus(status, "Choose an image first.", "error");
    return;
  }
  if (!canInfer()) {
    setStatus(status, NEEDS_API_TOKEN, "error");
    return;
  }
  const seq = ++state.seq;
  page.dataset.state = "loading";
  runButton.disabled = true;
  setStatus(status, "segmenting with both models…");
  try {
    const picks = { left: leftSelect.value, right: rightSelect.value };
    const files = [{ blob: state.blob, name: state.name }];
    const answers = await Promise.allSettled(SIDES.map((side) => segmentFiles(files, { model: picks[side] })));
    const img = await state.image;
    if (seq !== state.seq) return; // a newer run or image came meanwhile
    const errors = SIDES.map((side, i) => showAnswer(side, answers[i], picks[side])).filter(Boolean);
    for (const side of SIDES) drawSide(side, img);
    setStatus(status, errors.join("\n"), errors.length ? "error" : "");
    page.dataset.state = errors.length ? "error" : "done";
  } catch (err) {
    if (seq !== state.seq) return;
    setStatus(status, String(err), "error"); // a bug, not an answer: never left "loading"
    page.dataset.state = "error";
  } finally {
    if (seq === state.seq) runButton.disabled = false;
  }
}

/** Use a new image: the previous one's object URL is revoked and a run still on its way is dropped. */
function setImage(blob, name) {
  state.image?.then((img) => img && URL.revokeObjectURL(img.src));
  state.blob = blob;
  state.name = name || "image";
  state.image = loadImage(blob).catch(() => null); // null: drawn on grey at the answer's size
  state.seq++;
  runButton.disabled = false;
  for (const s of Object.values(sides)) s.result = null;
}

/**
 * Open a comparison from elsewhere (the train page): two model ids (left may be
 * "active") and an image (a Blob, or a promise of one, e.g. still being fetched);
 * then run it.
 */
export async function compareWith({ left, right, blob, name }) {
  const seq = ++state.seq;
  page.dataset.state = "loading";
  setStatus(status, "fetching the image…");
  try {
    const [image] = await Promise.all([blob, refreshModels({ left, right, force: true })]);
    if (seq !== state.seq) return; // the user chose another image meanwhile
    fileInput.value = "";
    setImage(image, name);
  } catch (err) {
    if (seq !== state.seq) return;
    setStatus(status, String(err), "error");
    page.dataset.state = "error";
    return;
  }
  await run();
}

export function init() {
  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (!file) return;
    setImage(file, file.name);
    page.dataset.state = "idle";
    setStatus(status, "");
  });
  runButton.addEventListener("click", run);
  slider.addEventListener("input", () => {
    $("#compare-score-threshold-value").textContent = Number(slider.value).toFixed(2);
    redraw();
  });
}
