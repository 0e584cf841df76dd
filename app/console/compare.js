// The compare page: one image, two models, side by side.

import { api, canInfer, getModels } from "./api.js";
import { drawDetections, formatTiming, loadImage } from "./draw.js";
import { $, fillModelSelect, setStatus } from "./ui.js";

const page = $("#page-compare");
const leftSelect = $("#compare-left");
const rightSelect = $("#compare-right");
const fileInput = $("#compare-file");
const runButton = $("#compare-run");
const slider = $("#compare-score-threshold");
const status = $("#compare-status");

const sides = {
  left: { canvas: $("#compare-canvas-left"), model: $("#compare-left-model"), timing: $("#compare-left-timing"), result: null },
  right: { canvas: $("#compare-canvas-right"), model: $("#compare-right-model"), timing: $("#compare-right-timing"), result: null },
};

const state = {
  blob: null, // the image to send: the chosen file, or one handed over by the train page
  name: "image",
  img: null,
  seq: 0,
};

export async function refreshModels({ left = null, right = null, force = false } = {}) {
  // left: a model id, or "active" for whichever model is active now
  if (!canInfer()) {
    setStatus(status, "Comparing needs the API token (or the admin token) when the server asks for one.");
    return;
  }
  try {
    const models = await getModels(force);
    const active = models.find((m) => m.active)?.id ?? null;
    const other = models.find((m) => !m.active)?.id ?? active;
    const wantLeft = left === "active" ? active : left;
    fillModelSelect(leftSelect, models, { preferred: wantLeft ?? (leftSelect.value || active) });
    fillModelSelect(rightSelect, models, { preferred: right ?? (rightSelect.value || other) });
    if (status.textContent.startsWith("Comparing needs")) setStatus(status, "");
  } catch (err) {
    setStatus(status, `models: ${err}`, "error");
  }
}

function drawSide(side) {
  const s = sides[side];
  if (!s.result || !state.img) return;
  const min = Number(slider.value);
  const dets = s.result.detections.filter((d) => d.score >= min);
  drawDetections(s.canvas, state.img, dets, { maxVh: 65 });
}

async function segmentWith(model) {
  const form = new FormData();
  form.append("images", state.blob, state.name);
  form.append("score_threshold", "0.05");
  form.append("mask_threshold", "0.5");
  form.append("mask_format", "rle");
  form.append("max_detections", "100");
  if (model) form.append("model", model);
  return api("v1/segment", { form });
}

export async function run() {
  if (!state.blob) {
    setStatus(status, "Choose an image first.", "error");
    return;
  }
  const seq = ++state.seq;
  page.dataset.state = "loading";
  runButton.disabled = true;
  setStatus(status, "segmenting with both models…");
  try {
    if (!state.img) state.img = await loadImage(state.blob);
    const picks = { left: leftSelect.value, right: rightSelect.value };
    const answers = await Promise.allSettled([segmentWith(picks.left), segmentWith(picks.right)]);
    if (seq !== state.seq) return;
    const errors = [];
    ["left", "right"].forEach((side, i) => {
      const s = sides[side];
      const answer = answers[i];
      if (answer.status === "fulfilled") {
        s.result = answer.value.results[0];
        s.model.textContent = answer.value.model.id;
        s.timing.textContent = formatTiming(answer.value.timing_ms);
        drawSide(side);
      } else {
        s.result = null;
        s.model.textContent = picks[side] || "–";
        s.timing.textContent = "";
        errors.push(`${side}: ${answer.reason}`);
      }
    });
    if (errors.length) throw new Error(errors.join("\n"));
    setStatus(status, "");
    page.dataset.state = "done";
  } catch (err) {
    if (seq !== state.seq) return;
    setStatus(status, String(err.message ?? err), "error");
    page.dataset.state = "error";
  } finally {
    if (seq === state.seq) runButton.disabled = false;
  }
}

async function setImage(blob, name) {
  if (state.img) URL.revokeObjectURL(state.img.src);
  state.blob = blob;
  state.name = name || "image";
  state.img = null;
  for (const s of Object.values(sides)) s.result = null;
}

/**
 * Open a comparison from elsewhere (the train page): two model ids (left may be
 * "active") and an image
 * (a Blob, or a promise of one, e.g. still being fetched); then run it.
 */
export async function compareWith({ left, right, blob, name }) {
  page.dataset.state = "loading";
  setStatus(status, "fetching the image…");
  try {
    const [image] = await Promise.all([blob, refreshModels({ left, right, force: true })]);
    fileInput.value = "";
    await setImage(image, name);
  } catch (err) {
    setStatus(status, String(err), "error");
    page.dataset.state = "error";
    return;
  }
  await run();
}

export function init() {
  fileInput.addEventListener("change", () => {
    const file = fileInput.files[0];
    if (file) setImage(file, file.name);
  });
  runButton.addEventListener("click", run);
  slider.addEventListener("input", () => {
    $("#compare-score-threshold-value").textContent = Number(slider.value).toFixed(2);
    drawSide("left");
    drawSide("right");
  });
}
