// The train page (admin token): datasets, training jobs, and following one job live.

import { api, authHeaders, errorFrom, getModels, hasAdmin, modelsChanged, uploadWithProgress } from "./api.js";
import { LineChart } from "./chart.js";
import { followEvents } from "./sse.js";
import { $, busy, el, formatDate, setStatus } from "./ui.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

let goTo = () => {};
let compareWith = async () => {};
let visible = false;

const lossChart = new LineChart($("#loss-chart"), [{ label: "loss", color: "#2a6df4" }]);
const mapChart = new LineChart(
  $("#map-chart"),
  [
    { label: "bbox mAP", color: "#2a6df4" },
    { label: "segm mAP", color: "#e76f51" },
  ],
  { yMin: 0 },
);

// The watched job: its latest state, the stream following it and the last event id had.
const watch = { id: null, job: null, controller: null, lastEventId: null };

// -- datasets ------------------------------------------------------------------

async function loadDatasets(select = null) {
  const { data } = await api("v1/datasets?limit=100", { auth: "admin" });
  $("#datasets-table tbody").replaceChildren(
    ...data.map((d) =>
      el(
        "tr",
        { dataset: { datasetId: d.id } },
        el("td", {}, d.id),
        el("td", {}, d.name),
        el("td", {}, d.num_images),
        el("td", {}, d.num_annotations),
        el("td", {}, formatDate(d.created_at)),
      ),
    ),
  );
  const jobDataset = $("#job-dataset");
  const previous = select ?? jobDataset.value;
  jobDataset.replaceChildren(...data.map((d) => el("option", { value: d.id }, `${d.name} (${d.id})`)));
  if (data.some((d) => d.id === previous)) jobDataset.value = previous;
}

async function upload() {
  const file = $("#dataset-file").files[0];
  const status = $("#dataset-status");
  const progress = $("#dataset-progress");
  if (!file) {
    setStatus(status, "Choose a COCO dataset .zip first.", "error");
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const name = $("#dataset-name").value.trim();
  if (name) form.append("name", name);
  progress.value = 0;
  setStatus(status, "uploading…");
  await busy($("#dataset-upload"), async () => {
    try {
      const ds = await uploadWithProgress("v1/datasets", form, {
        auth: "admin",
        onProgress: (f) => {
          progress.value = f;
          if (f >= 1) setStatus(status, "checking the dataset…");
        },
      });
      progress.value = 1;
      setStatus(status, `uploaded ${ds.name} (${ds.id}): ${ds.num_images} images, ${ds.num_annotations} annotations`, "ok");
      await loadDatasets(ds.id);
    } catch (err) {
      progress.value = 0; // nothing was kept: the bar does not say otherwise
      setStatus(status, String(err), "error");
    }
  });
}

// -- jobs ----------------------------------------------------------------------

async function loadBaseModels() {
  const select = $("#job-base-model");
  const previous = select.value || "demo";
  const models = await getModels();
  const ids = ["demo", ...models.map((m) => m.id).filter((id) => id !== "demo" && /^(model-|coco)/.test(id))];
  select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (ids.includes(previous)) select.value = previous;
}

function jobRow(job) {
  const row = el(
    "tr",
    { dataset: { jobId: job.id }, className: job.id === watch.id ? "selected" : "", tabIndex: 0 },
    el("td", {}, job.id),
    el("td", {}, el("span", { className: `badge ${job.state}` }, job.state)),
    el("td", {}, job.dataset_id),
    el("td", {}, formatDate(job.created_at)),
  );
  row.addEventListener("click", () => watchJob(job.id));
  row.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" && e.key !== " ") return;
    e.preventDefault();
    watchJob(job.id);
  });
  return row;
}

async function loadJobs() {
  const { data } = await api("v1/training-jobs?limit=50", { auth: "admin" });
  $("#jobs-table tbody").replaceChildren(...data.map(jobRow));
}

async function startJob() {
  const status = $("#job-start-status");
  const dataset = $("#job-dataset").value;
  if (!dataset) {
    setStatus(status, "Upload a dataset first.", "error");
    return;
  }
  const body = {
    dataset_id: dataset,
    base_model: $("#job-base-model").value || "demo",
    epochs: Number($("#job-epochs").value),
    batch_size: Number($("#job-batch-size").value),
    learning_rate: Number($("#job-learning-rate").value),
    val_fraction: Number($("#job-val-fraction").value),
  };
  await busy($("#job-start"), async () => {
    try {
      const job = await api("v1/training-jobs", { json: body, auth: "admin" });
      setStatus(status, `queued ${job.id}`, "ok");
      watchJob(job.id, job);
      await loadJobs();
    } catch (err) {
      setStatus(status, String(err), "error");
    }
  });
}

// -- watching one job ------------------------------------------------------------

function formatEta(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

const ap = (stats) => (stats && typeof stats.AP === "number" && stats.AP >= 0 ? stats.AP : null);

function addEpoch(entry) {
  mapChart.add(0, entry.epoch, ap(entry.bbox));
  mapChart.add(1, entry.epoch, ap(entry.segm));
  const metrics = watch.job.metrics || (watch.job.metrics = []);
  const at = metrics.findIndex((m) => m.epoch === entry.epoch);
  if (at >= 0) metrics[at] = entry;
  else metrics.push(entry);
}

function addProgress(progress) {
  watch.job.progress = progress;
  if (progress.step > 0) lossChart.add(0, progress.step, progress.loss);
}

/** Show the watched job's fields, buttons and charts. */
function render() {
  const job = watch.job;
  if (!job) return;
  $("#job-id").textContent = job.id;
  const state = $("#job-state");
  state.textContent = job.state;
  state.className = `badge ${job.state}`;
  const p = job.progress || {};
  const steps = p.total_steps ? `${p.step ?? 0}/${p.total_steps}` : `${p.step ?? 0}`;
  $("#job-progress").textContent = `epoch ${p.epoch ?? 0}/${p.epochs ?? job.config?.epochs ?? "?"}, step ${steps}`;
  $("#job-eta").textContent = FINAL.has(job.state) ? "–" : formatEta(p.eta_s);
  $("#job-error").textContent = job.error || "";
  $("#job-cancel").disabled = !(job.state === "queued" || job.state === "running");
  const succeeded = job.state === "succeeded" && !!job.model_id;
  $("#job-compare").hidden = !succeeded;
  $("#job-activate").hidden = !succeeded;
  lossChart.draw();
  mapChart.draw();
  $("#loss-chart").dataset.points = String(lossChart.count(0));
  $("#map-chart").dataset.points = String(watch.job.metrics?.length ?? 0);
  // the job's row in the table: its state badge, updated in place (keeps keyboard focus)
  const badge = document.querySelector(`#jobs-table tr[data-job-id="${CSS.escape(job.id)}"] .badge`);
  if (badge) {
    badge.textContent = job.state;
    badge.className = `badge ${job.state}`;
  }
  for (const r of document.querySelectorAll("#jobs-table tbody tr")) r.classList.toggle("selected", r.dataset.jobId === job.id);
}

function onEvent(name, data, id) {
  if (id !== null) watch.lastEventId = id;
  const job = watch.job;
  if (!job) return;
  if (name === "state") {
    Object.assign(job, { state: data.state, error: data.error, model_id: data.model_id });
  } else if (name === "progress") {
    addProgress(data);
  } else if (name === "epoch") {
    addEpoch(data);
  } else if (name === "done") {
    watch.job = data;
    addProgress(data.progress || {});
    for (const entry of data.metrics || []) addEpoch(entry);
    if (data.state === "succeeded") modelsChanged();
  }
  render();
}

/** Follow the watched job's events from where we were (none: from the start). */
function follow() {
  stopFollowing();
  if (!watch.id || !watch.job) return;
  // a final job needs no stream once read whole (no event had yet) or once its `done` came
  // (event ids are `<stage>.<step>.<epochs>`, stage 4 after `done`)
  const complete = watch.lastEventId === null || watch.lastEventId.startsWith("4.");
  if (FINAL.has(watch.job.state) && complete) return;
  const controller = new AbortController();
  watch.controller = controller;
  const status = $("#job-watch-status");
  followEvents(`v1/training-jobs/${encodeURIComponent(watch.id)}/events`, {
    headers: () => authHeaders("admin"),
    // only this follower's events, for the job it follows (never a previous job's)
    onEvent: (...event) => watch.controller === controller && onEvent(...event),
    onStatus: (text) => setStatus(status, text),
    signal: controller.signal,
    makeError: (code, text) => errorFrom(code, text),
    lastEventId: watch.lastEventId,
  })
    .catch((err) => watch.controller === controller && setStatus(status, `events: ${err}`, "error", { sticky: true }))
    .finally(() => {
      if (watch.controller === controller) watch.controller = null;
    });
}

function stopFollowing() {
  watch.controller?.abort();
  watch.controller = null;
}

/** Empty the watch panel while a job is being read (no button acts on the previous one). */
function clearWatch(id) {
  watch.job = null;
  $("#job-id").textContent = id;
  $("#job-state").textContent = "…";
  $("#job-state").className = "badge";
  for (const field of ["#job-progress", "#job-eta"]) $(field).textContent = "–";
  $("#job-error").textContent = "";
  $("#job-cancel").disabled = true;
  $("#job-compare").hidden = $("#job-activate").hidden = true;
}

/** Watch a job: its fields now, then its events. */
export async function watchJob(id, job = null) {
  stopFollowing();
  watch.id = id;
  watch.lastEventId = null;
  lossChart.clear();
  mapChart.clear();
  clearWatch(id);
  setStatus($("#job-watch-status"), "");
  let found = job;
  try {
    found ??= await api(`v1/training-jobs/${encodeURIComponent(id)}`, { auth: "admin" });
  } catch (err) {
    if (watch.id === id) setStatus($("#job-watch-status"), String(err), "error");
    return;
  }
  if (watch.id !== id) return; // another job was picked meanwhile
  watch.job = found;
  watch.job.metrics = [...(watch.job.metrics || [])];
  addProgress(watch.job.progress || {});
  for (const entry of watch.job.metrics) addEpoch(entry);
  render();
  if (visible) follow();
}

async function cancelJob() {
  const status = $("#job-watch-status");
  const id = watch.id;
  await busy($("#job-cancel"), async () => {
    try {
      const job = await api(`v1/training-jobs/${encodeURIComponent(id)}/cancel`, { method: "POST", auth: "admin" });
      if (watch.job?.id !== id) return; // another job is watched now
      Object.assign(watch.job, { state: job.state, cancel_requested: job.cancel_requested });
      setStatus(status, job.state === "cancelled" ? "cancelled" : "cancel requested: the job stops at its next step", "ok");
    } catch (err) {
      setStatus(status, String(err), "error");
    }
  });
  render();
}

async function compareModel() {
  const job = watch.job;
  const status = $("#job-watch-status");
  await busy($("#job-compare"), async () => {
    try {
      // the compare page shows the fetch of the held-out image and the comparison
      const blob = api(`v1/training-jobs/${encodeURIComponent(job.id)}/validation-image`, { auth: "admin", as: "blob" });
      blob.catch(() => {}); // reported by the compare page
      goTo("compare");
      await compareWith({ left: "active", right: job.model_id, blob, name: `${job.id}-validation` });
    } catch (err) {
      setStatus(status, String(err), "error");
    }
  });
}

async function activateModel() {
  const id = watch.job.model_id;
  const status = $("#job-watch-status");
  await busy($("#job-activate"), async () => {
    try {
      setStatus(status, `activating ${id}…`);
      await api(`v1/models/${encodeURIComponent(id)}/activate`, { method: "POST", auth: "admin" });
      setStatus(status, `${id} is now the active model`, "ok");
      modelsChanged();
    } catch (err) {
      setStatus(status, String(err), "error");
    }
  });
}

// -- page ----------------------------------------------------------------------

/** Reload datasets, jobs and base models (admin token only: no request without it). */
export async function refresh() {
  const admin = hasAdmin();
  $("#train-admin-note").hidden = admin;
  $("#train-body").hidden = !admin;
  if (!admin) {
    stopFollowing();
    return;
  }
  if (!visible) return;
  if (!watch.controller) follow(); // e.g. the admin token was typed again
  const results = await Promise.allSettled([loadDatasets(), loadJobs(), loadBaseModels()]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) setStatus($("#job-start-status"), String(failed.reason), "error", { sticky: true });
  lossChart.draw();
  mapChart.draw();
}

/** The models changed (a job's model, an activation): the base-model choices follow. */
export function onModelsChanged() {
  if (!visible || !hasAdmin()) return;
  const sticky = { sticky: true }; // the choices are stale until a refresh loads them
  loadBaseModels().catch((err) => setStatus($("#job-start-status"), `models: ${err}`, "error", sticky));
}

export function onShow() {
  visible = true;
  refresh(); // resumes following the watched job, with Last-Event-ID
}

export function onHide() {
  visible = false;
  stopFollowing(); // resumed with Last-Event-ID when the page is shown again
}

export function init(hooks) {
  ({ goTo, compareWith } = hooks);
  $("#dataset-upload").addEventListener("click", upload);
  $("#job-start").addEventListener("click", startJob);
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#job-compare").addEventListener("click", compareModel);
  $("#job-activate").addEventListener("click", activateModel);
  $("#train-admin-note").hidden = hasAdmin();
  $("#train-body").hidden = !hasAdmin();
}
