// The models page: what the deployment knows, and activation (admin token).

import { NEEDS_API_TOKEN, api, canInfer, getModels, hasAdmin, modelsChanged } from "./api.js";
import { $, el, formatDate, setStatus } from "./ui.js";

const tbody = $("#models-table tbody");
const status = $("#models-status");
const note = $("#models-admin-note");
const refreshButton = $("#models-refresh");
const ADMIN_NOTE = "Activating a model needs the admin token (type it above and save).";
let visible = false;
let seq = 0; // only the latest listing is shown

/** COCO AP (stats[0]) of a model's `bbox` or `segm` metrics, formatted; "–" if absent. */
export function formatAp(metrics, kind) {
  let stats = metrics?.[kind];
  if (stats === undefined && Array.isArray(metrics)) stats = metrics.at(-1)?.[kind]; // per-epoch list
  let ap = null;
  if (Array.isArray(stats)) ap = stats[0];
  else if (stats && typeof stats === "object") ap = stats.AP ?? Object.values(stats)[0];
  else if (typeof stats === "number") ap = stats;
  return typeof ap === "number" && ap >= 0 ? ap.toFixed(3) : "–";
}

function row(model) {
  const idCell = el("td", {}, model.id, " ");
  if (model.active) idCell.append(el("span", { className: "badge active" }, "active"));
  const action = el("td");
  if (!model.active) {
    const button = el("button", { type: "button", className: "activate", dataset: { modelId: model.id } }, "Activate");
    button.disabled = !hasAdmin();
    button.title = hasAdmin() ? `serve ${model.id}` : "needs the admin token";
    button.addEventListener("click", () => activate(model.id));
    action.append(button);
  }
  return el(
    "tr",
    { className: model.active ? "active" : "", dataset: { modelId: model.id } },
    idCell,
    el("td", {}, model.base_model ?? "–"),
    el("td", {}, model.dataset_id ?? "–"),
    el("td", {}, formatAp(model.metrics, "bbox")),
    el("td", {}, formatAp(model.metrics, "segm")),
    el("td", {}, formatDate(model.created_at)),
    action,
  );
}

async function activate(id) {
  for (const b of tbody.querySelectorAll("button.activate")) b.disabled = true;
  setStatus(status, `activating ${id}… (loading and warming it up)`);
  try {
    await api(`v1/models/${encodeURIComponent(id)}/activate`, { method: "POST", auth: "admin" });
    setStatus(status, `${id} is now the active model`, "ok");
    modelsChanged(); // every page reloads its model list (this table too)
  } catch (err) {
    setStatus(status, String(err), "error");
    for (const b of tbody.querySelectorAll("button.activate")) b.disabled = !hasAdmin();
  }
}

/** Reload the table (when the page is shown). */
export async function refresh({ force = true } = {}) {
  note.textContent = hasAdmin() ? "" : ADMIN_NOTE;
  if (!visible) return;
  const mine = ++seq;
  if (!canInfer()) {
    tbody.replaceChildren();
    setStatus(status, NEEDS_API_TOKEN);
    refreshButton.disabled = false;
    return;
  }
  refreshButton.disabled = true;
  try {
    const models = await getModels(force);
    if (mine !== seq) return;
    tbody.replaceChildren(...models.map(row));
    if (!status.classList.contains("ok")) setStatus(status, `${models.length} model(s)`);
  } catch (err) {
    if (mine === seq) setStatus(status, String(err), "error");
  } finally {
    if (mine === seq) refreshButton.disabled = false;
  }
}

export function onShow() {
  visible = true;
  setStatus(status, "");
  refresh();
}

export function onHide() {
  visible = false;
}

export function init() {
  refreshButton.addEventListener("click", () => {
    setStatus(status, "");
    refresh();
  });
  note.textContent = hasAdmin() ? "" : ADMIN_NOTE;
}
