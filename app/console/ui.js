// Small DOM helpers shared by the pages.

export const $ = (selector, root = document) => root.querySelector(selector);

/** Create an element: el("td", {className: "x", dataset: {a: 1}}, "text", child). */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/**
 * Show a message in a status element; kind: "" | "error" | "ok". ``sticky``: a
 * state rather than an answer (the event stream broke, a list did not load): the
 * next action does not clear it.
 */
export function setStatus(node, text, kind = "", { sticky = false } = {}) {
  node.textContent = text;
  node.classList.toggle("error", kind === "error");
  node.classList.toggle("ok", kind === "ok");
  if (sticky) node.dataset.sticky = "true";
  else delete node.dataset.sticky;
}

/**
 * A line that answers an action (an error, or "ok") answers only that one: the next
 * action anywhere in the console (a click on a control, a changed field) clears
 * them all before its own handler writes its answer, so no answer outlives its question.
 */
export function clearAnswersOnNextAction() {
  const clear = (e) => {
    if (!e.target.closest?.("button, input, select, [tabindex]")) return;
    for (const line of document.querySelectorAll(".status.error, .status.ok")) {
      if (!line.dataset.sticky) setStatus(line, "");
    }
  };
  document.addEventListener("click", clear, true);
  document.addEventListener("change", clear, true);
}

/** Save a Blob under `name` via a temporary <a download>. */
export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Run `task` with `button` disabled. */
export async function busy(button, task) {
  button.disabled = true;
  try {
    return await task();
  } finally {
    button.disabled = false;
  }
}

/** A date-time string (or null) for tables. */
export function formatDate(value) {
  if (!value) return "–";
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : d.toLocaleString();
}

/** Fill a <select> with model options, keeping the current choice when it still exists. */
export function fillModelSelect(select, models, { activeOption = null, preferred = null } = {}) {
  const previous = preferred ?? select.value;
  select.replaceChildren();
  if (activeOption !== null) select.append(el("option", { value: "" }, activeOption));
  for (const m of models) {
    select.append(el("option", { value: m.id }, m.active ? `${m.id} (active)` : m.id));
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}
