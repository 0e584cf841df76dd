// Entry point: pages and the URL hash, tokens, the window.maskrcnnConsole test hooks.

import { probeServer, saveTokens, tokens } from "./api.js";
import { decodeRle } from "./rle.js";
import * as segment from "./segment.js";
import * as compare from "./compare.js";
import * as models from "./models.js";
import * as train from "./train.js";
import { $, clearAnswersOnNextAction, setStatus } from "./ui.js";

const PAGES = { segment, compare, models, train };
let current = null;

function showPage(name) {
  if (!(name in PAGES)) name = "segment";
  if (name === current) return;
  const previous = current;
  current = name;
  for (const key of Object.keys(PAGES)) $(`#page-${key}`).hidden = key !== name;
  for (const button of document.querySelectorAll("button[data-page]")) {
    if (button.dataset.page === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  if (previous) PAGES[previous].onHide?.();
  PAGES[name].onShow?.();
  announceModel();
}

/** Go to a page (also from other modules: the train page opens compare). */
export function goTo(name) {
  if (location.hash !== `#${name}`) history.pushState(null, "", `#${name}`);
  showPage(name);
}

let statusTimer = 0;

function initTokens() {
  const apiInput = $("#api-token");
  const adminInput = $("#admin-token");
  apiInput.value = tokens.api;
  adminInput.value = tokens.admin;
  const save = () => {
    saveTokens(apiInput.value, adminInput.value);
    setStatus($("#tokens-status"), "saved for this tab");
    clearTimeout(statusTimer);
    statusTimer = setTimeout(() => setStatus($("#tokens-status"), ""), 2500);
  };
  // the Save button (type=submit) and Enter in either field
  $("#tokens-form").addEventListener("submit", (e) => {
    e.preventDefault(); // nothing is ever submitted (form-action 'none')
    save();
  });
}

/** The banner saying the served model is the synthetic-shapes demo, from /readyz
 * (public: it needs no token). Asked again on every page change and activation. */
async function announceModel() {
  try {
    const response = await fetch("readyz", { cache: "no-store" });
    const ready = await response.json();
    if (ready.model) $("#demo-banner").hidden = ready.model.kind !== "demo";
  } catch {
    // not ready yet, or gone: the banner stays as it was
  }
}

/** Every page refreshes what it shows (after tokens are saved, or models changed). */
function refreshAll() {
  segment.refreshModels();
  compare.refreshModels();
  models.refresh();
  train.refresh();
}

async function main() {
  window.maskrcnnConsole = {
    decodeRle,
    get lastResponse() {
      return segment.lastResponse();
    },
    visibleDetections: segment.visibleDetections,
    goTo,
  };
  initTokens();
  clearAnswersOnNextAction();
  segment.init();
  compare.init({ goTo });
  models.init();
  train.init({ goTo, compareWith: compare.compareWith });

  for (const button of document.querySelectorAll("button[data-page]")) {
    button.addEventListener("click", () => goTo(button.dataset.page));
  }
  // back/forward and typed hashes (showPage ignores the page already shown)
  window.addEventListener("hashchange", () => showPage(location.hash.slice(1)));
  window.addEventListener("popstate", () => showPage(location.hash.slice(1)));
  // the job's event stream stops with the page, and resumes if it comes back from the cache
  window.addEventListener("pagehide", () => train.onHide());
  window.addEventListener("pageshow", (e) => e.persisted && current === "train" && train.onShow());

  await probeServer(); // whether inference needs a token, so no request is sent to fail
  showPage(location.hash.slice(1));
  await Promise.allSettled([segment.refreshModels(), compare.refreshModels(), announceModel()]); // no request without a token
  document.addEventListener("maskrcnn:tokens", refreshAll);
  document.addEventListener("maskrcnn:models", () => {
    announceModel();
    segment.refreshModels();
    compare.refreshModels();
    models.refresh({ force: false });
    train.onModelsChanged();
  });
  document.documentElement.dataset.ready = "true";
}

main();
