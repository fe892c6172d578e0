// The Fusion Training Console: views over the Fusion API. Every figure shown comes from the API;
// settings' defaults, ranges and guidance come from its OpenAPI document (the settings models).

import { api, ApiError, ready } from "/console/api.js";
import { lineChart } from "/console/chart.js";
import { duration, fixed, grouped, human, money, params, tokens, when } from "/console/format.js";
import { tuneRoutes } from "/console/tune.js";

const ESTIMATE_DEBOUNCE_MS = 350;
const POLL_MS = 2000;
const RETRY_MS = 5000;
const IDLE_POLL_MS = 10000; // the jobs list with nothing active: a job started elsewhere still shows
const ACTIVE = ["queued", "launching", "running", "cancelling"];
const main = document.getElementById("main");
const banner = document.getElementById("banner");
let timers = [];
let spec = null;

// ---- DOM ------------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const link = (href, text, attrs = {}) => h("a", { href, ...attrs }, text);
const modelLink = (id) => (id ? link(`#/models/${encodeURIComponent(id)}`, id) : "–");
const jobLink = (id) => (id ? link(`#/jobs/${encodeURIComponent(id)}`, id) : "–");
const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);

// A table in a box that scrolls sideways; when its columns overflow the box, a line above it and a
// shadow on the hidden side say so (a phone, or a wide catalog at desktop width).
function table(headers, rows, attrs = {}) {
  const cue = h("p", { class: "scroll-cue", hidden: true, "aria-hidden": "true" }, "More columns: scroll sideways →");
  const box = h("div", { class: "scroll", tabindex: 0, role: "region", "aria-label": attrs["aria-label"] ? `${attrs["aria-label"]} (scrolls sideways)` : undefined },
    h("table", attrs, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))), h("tbody", {}, rows)));
  const check = () => {
    const hidden = box.scrollWidth - box.clientWidth - box.scrollLeft;
    box.toggleAttribute("data-overflow", box.scrollWidth > box.clientWidth + 1);
    box.toggleAttribute("data-more-right", hidden > 1);
    cue.hidden = !(box.scrollWidth > box.clientWidth + 1);
  };
  new ResizeObserver(check).observe(box);
  box.addEventListener("scroll", check, { passive: true });
  return h("div", { class: "table" }, cue, box);
}

function pairs(items, attrs = {}) {
  return h("dl", { class: "pairs", ...attrs }, items.filter(Boolean).flatMap(([k, v, key]) =>
    [h("dt", {}, k), h("dd", key ? { "data-key": key } : {}, v)]));
}

function showError(error) {
  banner.hidden = false;
  banner.textContent = error instanceof Error ? error.message : String(error);
}

function clearError() {
  banner.hidden = true;
  banner.textContent = "";
}

function render(title, ...children) {
  document.title = `${title} · Fusion Training Console`;
  main.replaceChildren(h("h1", {}, title), ...children.filter(Boolean));
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  timers.push(() => clearInterval(id));
}

function debounce(fn, ms) {
  let id = null;
  const run = (...args) => { clearTimeout(id); id = setTimeout(() => fn(...args), ms); };
  timers.push(() => clearTimeout(id));
  return run;
}

function newKey() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

// ---- settings from the OpenAPI document ------------------------------------------------------

async function schemaOf(name) {
  spec = spec || await api("GET", "/openapi.json");
  const schemas = spec.components?.schemas || {};
  const found = schemas[name] || Object.values(schemas).find((s) => s.title === name);
  if (!found) throw new Error(`The API's OpenAPI document has no ${name} schema.`);
  return found;
}

function fieldSchema(property) {
  const plain = (property.anyOf || []).find((s) => s.type && s.type !== "null");
  return { ...(plain || {}), ...property, type: plain?.type || property.type };
}

function rangeText(f) {
  const lower = f.minimum !== undefined ? `${f.minimum}` : f.exclusiveMinimum !== undefined ? `above ${f.exclusiveMinimum}` : null;
  const upper = f.maximum ?? null;
  if (f.minimum !== undefined && upper !== null) return `range ${f.minimum}–${upper}`;
  if (lower !== null && upper !== null) return `${lower}, at most ${upper}`;
  if (lower !== null) return f.minimum !== undefined ? `at least ${lower}` : lower;
  if (upper !== null) return `at most ${upper}`;
  return "";
}

function defaultText(name, f) {
  if (f.default === null || f.default === undefined) {
    return /\bDefault:/.test(f.description || "") ? "" : "default: none";
  }
  return `default ${f.default}`;
}

// Each setting's label in words; the API's key follows it as secondary text.
const LABELS = {
  turns: "Turns", cycles: "Learning-rate cycles per turn", steps_per_cycle: "Steps per cycle",
  lr: "Peak learning rate", seq_len: "Sequence length (tokens)", train_steps: "Steps per turn, replacing cycles × steps",
  output_name: "Name of the new model", num_layers_to_contract: "Blocks to prune",
  contraction_ratio: "Share of each pruned block removed", source_model_id: "Source model",
};
const labelFor = (name, words) => [words || LABELS[name] || name, " ", h("code", { class: "key" }, name)];

// A labelled input for one setting, with its default, range and guidance on one line.
function settingField(name, property, { max, value, label, maxWhy } = {}) {
  const f = fieldSchema(property);
  const id = `f-${name}`;
  const numeric = f.type === "integer" || f.type === "number";
  const hi = max !== undefined ? Math.min(max, f.maximum ?? max) : f.maximum;
  const input = h("input", {
    id, name, type: numeric ? "number" : "text",
    min: f.minimum ?? f.exclusiveMinimum, max: hi,
    step: f.type === "integer" ? 1 : numeric ? "any" : undefined,
    placeholder: f.default !== undefined && f.default !== null ? `default ${f.default}` : name === "output_name" ? "default: model-<job id>" : "",
    pattern: f.pattern && !numeric ? htmlPattern(f.pattern) : undefined,
    "aria-describedby": `${id}-hint ${id}-error`, inputmode: f.type === "integer" ? "numeric" : undefined,
  });
  if (value !== undefined && value !== null) input.value = value;
  let range = max !== undefined && f.maximum === undefined ? `range ${f.minimum ?? 1}–${hi}` : rangeText({ ...f, maximum: hi });
  // A bound tighter than the API's own (a model's context, depth) says where it comes from, and the API's.
  if (maxWhy && max !== undefined && f.maximum !== undefined && max < f.maximum) range += ` (${maxWhy}; the API's most is ${grouped(f.maximum)})`;
  const hint = [defaultText(name, f), range, f.description].filter(Boolean).join(" · ");
  return h("div", { class: "field", "data-field": name },
    h("label", { for: id }, ...labelFor(name, label)),
    input,
    h("p", { class: "hint", id: `${id}-hint` }, hint),
    h("p", { class: "error", id: `${id}-error`, role: "alert" }));
}

// An HTML pattern attribute is compiled with the v flag, where a literal "-" in a class needs a "\\".
const htmlPattern = (pattern) => pattern?.replace(/^\^|\$$/g, "").replace(/(?<!\\)-\]/g, "\\-]");

function readSettings(form, names) {
  const out = {};
  for (const name of names) {
    const input = form.elements.namedItem(name);
    if (!input || input.value.trim() === "") continue;
    const raw = input.value.trim();
    out[name] = input.type === "number" || input.type === "range" ? Number(raw) : raw;
  }
  return out;
}

// The API's field errors beside the fields that caused them; the rest above the form.
function showFieldErrors(form, error, general) {
  for (const node of form.querySelectorAll(".field .error")) node.textContent = "";
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  general.textContent = "";
  if (!error) return;
  const loose = [];
  for (const detail of error.details || []) {
    const name = String(detail.field || "").split(".").pop();
    const field = form.querySelector(`.field[data-field="${CSS.escape(name)}"]`);
    if (field) {
      field.querySelector(".error").textContent = detail.message;
      field.querySelector("input,select")?.setAttribute("aria-invalid", "true");
    } else {
      loose.push(`${detail.field}: ${detail.message}`);
    }
  }
  if (!error.details?.length || loose.length) general.textContent = loose.length ? `${error.message} (${loose.join("; ")})` : error.message;
}

// ---- estimate -------------------------------------------------------------------------------

function formula(quote) {
  const s = quote.settings, e = quote.estimate;
  if (quote.type === "train") {
    const steps = s.train_steps !== null && s.train_steps !== undefined
      ? [`${grouped(s.train_steps)} train_steps`]
      : [`${grouped(s.cycles)} cycles`, `${grouped(s.steps_per_cycle)} steps_per_cycle`];
    return `${grouped(s.turns)} turns × ${steps.join(" × ")} × ${grouped(s.seq_len)} seq_len = ${grouped(e.training_tokens)} tokens`;
  }
  return `${grouped(s.train_steps)} healing train_steps = ${grouped(e.training_tokens)} tokens`;
}

function estimatePanel(quote) {
  const e = quote.estimate;
  const launch = e.launch_seconds ? `, ${duration(e.launch_seconds)} of it starting the instance` : "";
  const rows = [
    quote.schedule ? ["What runs", quote.schedule, "schedule"] : null,
    ["Billed tokens", h("span", {}, `${tokens(e.training_tokens)} `, h("code", { class: "formula" }, formula(quote))), "tokens"],
    e.trained_tokens ? ["Trained tokens", `${tokens(e.trained_tokens)}: each step trains on ${e.sequences_per_step} sequences`, "trained_tokens"] : null,
    ["Parameters", `${params(e.parameters)} · tier ${e.tier} at ${money(e.usd_per_million_tokens)} per 1M billed tokens`, "tier"],
    e.contraction ? ["After contraction", forecastText(e.parameters, e.contraction), "contraction"] : null,
    ["Training cost", money(e.training_cost), "training_cost"],
    e.growth_parameters ? ["Growth fee", `${money(e.growth_fee)} for ${params(e.growth_parameters)} added`, "growth_fee"] : null,
    Number(e.contraction_fee) ? ["Contraction fee", money(e.contraction_fee), "contraction_fee"] : null,
    Number(e.minimum_charge) ? ["Minimum charge", `${money(e.minimum_charge)}: the least any job pays`, "minimum_charge"] : null,
    ["Total", h("strong", {}, money(e.total)), "total"],
    ["ETA on AWS", `${duration(e.eta_seconds)} on ${e.instance_count} × ${e.instance_type}${launch}`, "eta"],
    ["Budget left", `${money(e.remaining_budget ?? quote.budget?.remaining)} of ${money(quote.budget?.limit)}`, "budget"],
  ];
  const warnings = (quote.warnings || []).map((w) => h("li", {}, w));
  if (!quote.allowed_to_proceed) warnings.push(h("li", {}, `Over budget: ${money(e.total)} exceeds the ${money(e.remaining_budget)} left.`));
  return [pairs(rows, { "data-testid": "estimate" }),
    warnings.length ? h("ul", { class: "warnings", "aria-label": "Warnings" }, warnings) : null];
}

// The API's forecast of a contraction: parameters (a range when the blocks it may pick differ),
// depth, and what the pruned blocks keep.
function forecastText(before, f) {
  const size = f.parameters_min === f.parameters_max ? params(f.parameters_min)
    : `${params(f.parameters_min)} to ${params(f.parameters_max)}, as the calibration picks the blocks`;
  const shape = (l) => `${l.n_heads} head${l.n_heads === 1 ? "" : "s"} (${l.n_kv_heads} kv), ${grouped(l.mlp_hidden)} MLP unit${l.mlp_hidden === 1 ? "" : "s"}`;
  return h("span", {}, h("strong", { "data-key": "after-parameters" }, size), ` (${change(f.parameters_max, before)}) · depth ${f.depth}`,
    h("ul", { class: "settings" }, f.layers.map((c) => h("li", {}, `${c.count} block${c.count === 1 ? "" : "s"}: ${shape(c.before)} → ${shape(c.after)}`))));
}

function estimator(form, body, panel, general) {
  let seq = 0;
  const run = async () => {
    const mine = ++seq;
    panel.setAttribute("aria-busy", "true");
    try {
      const quote = await api("POST", "/jobs/estimate", body());
      if (mine !== seq) return;
      showFieldErrors(form, null, general);
      panel.replaceChildren(h("h2", {}, "Estimate"), ...estimatePanel(quote).filter(Boolean));
    } catch (error) {
      if (mine !== seq) return;
      if (error.status === 422 || error.status === 404) {
        showFieldErrors(form, error, general);
        panel.replaceChildren(h("h2", {}, "Estimate"), h("p", { class: "muted" }, "Fix the highlighted fields to see the price."));
      } else showError(error);
    } finally {
      if (mine === seq) panel.removeAttribute("aria-busy");
    }
  };
  return { now: run, soon: debounce(run, ESTIMATE_DEBOUNCE_MS) };
}

// One job per intent: a second click while the first request is out does nothing, and a retry
// after a lost answer sends the same Idempotency-Key, so the API answers with the same job.
function submitter(form, body, general, button) {
  let key = newKey(), busy = false;
  form.addEventListener("input", () => { key = newKey(); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (busy) return;
    busy = true;
    button.setAttribute("aria-busy", "true");
    try {
      let job = null;
      for (let attempt = 0; job === null; attempt++) {
        try {
          job = await api("POST", "/jobs", body(), { "idempotency-key": key });
        } catch (error) {
          if (error.code !== "idempotency_key_in_progress" || attempt >= 20) throw error;
          await new Promise((resolve) => setTimeout(resolve, 500));
        }
      }
      location.hash = `#/jobs/${encodeURIComponent(job.job_id)}`;
    } catch (error) {
      if (error.status && error.status < 500) showFieldErrors(form, error, general);
      else showError(error);
    } finally {
      busy = false;
      button.removeAttribute("aria-busy");
    }
  });
}

// ---- views ----------------------------------------------------------------------------------

function lineage(models) {
  const byId = new Map(models.map((m) => [m.model_id, m]));
  const family = (m) => { let x = m; while (x.parent_id && byId.has(x.parent_id)) x = byId.get(x.parent_id); return x.model_id; };
  const children = new Map();
  for (const m of models) if (m.parent_id) children.set(m.parent_id, [...(children.get(m.parent_id) || []), m]);
  const branch = (m) => h("li", {}, modelLink(m.model_id), m.job_id ? h("span", { class: "muted" }, " via job ", jobLink(m.job_id)) : "",
    children.has(m.model_id) ? h("ul", {}, children.get(m.model_id).map(branch)) : null);
  const roots = models.filter((m) => !m.parent_id || !byId.has(m.parent_id)).filter((m) => children.has(m.model_id) || m.kind !== "base");
  return { family, tree: roots.length ? h("ul", { class: "tree", "aria-label": "Lineage" }, roots.map(branch)) : null };
}

async function viewModels() {
  const listed = (await api("GET", "/models")).models;
  const models = [...listed.filter((m) => m.kind !== "base"), ...listed.filter((m) => m.kind === "base")]; // yours first
  const { family, tree } = lineage(models);
  const rows = models.map((m) => h("tr", { "data-model": m.model_id },
    h("td", {}, modelLink(m.model_id)), h("td", {}, m.name), h("td", {}, m.kind), h("td", {}, family(m)),
    h("td", { class: "num" }, params(m.parameters)), h("td", { class: "num" }, m.depth),
    h("td", { class: "num" }, fixed(m.perplexity)), h("td", { class: "num" }, money(m.cost)),
    h("td", {}, modelLink(m.parent_id)), h("td", {}, jobLink(m.job_id))));
  const own = models.filter((m) => m.kind !== "base");
  render("Models",
    h("p", {}, "Your models first, then the public base models. ", link("#/jobs/new", "Train a model")),
    table(["Model", "Name", "Kind", "Family", "Parameters", "Depth", "Perplexity", "Cost", "Parent", "Job"], rows, { "aria-label": "Catalog" }),
    h("h2", {}, "Lineage"),
    own.length ? tree : h("p", { class: "empty" }, "No models of your own yet. ", link("#/datasets", "Upload a dataset"), ", then ", link("#/jobs/new", "train a base model"), "."));
}

function viewHome() {
  const step = (n, title, words, href, action) => h("li", { class: "step" }, h("h2", {}, `${n}. ${title}`), h("p", {}, words),
    link(href, action, { class: "button" }));
  render("Train your own language model",
    h("p", { class: "lead" }, "Fusion grows a base model and trains it on your text, or contracts a trained model into a "
      + "smaller one. Every job is priced before it starts, and every model lands in your catalog with its perplexity, "
      + "size, cost and lineage."),
    h("ol", { class: "steps", "aria-label": "Getting started" },
      step(1, "Upload a dataset", "Plain text or JSON lines with a \"text\" field; it is checked as it lands.", "#/datasets", "Upload a dataset"),
      step(2, "Train a model", "Pick a base model and your dataset; the estimate shows the price and time as you type.", "#/jobs/new", "Start a train job"),
      step(3, "Contract it", "Prune a trained model into a smaller one, and compare it with its parent.", "#/models", "Open your models")));
}

async function downloadLink(model) {
  spec = spec || await api("GET", "/openapi.json");
  const path = Object.keys(spec.paths || {}).find((p) => /^\/models\/\{[^}]+\}\/download$/.test(p));
  const uri = model.artifact_uri ? [" ", copyButton(model.artifact_uri)] : [];
  if (!path || model.kind === "base") return ["Artifact", h("span", {}, h("code", {}, model.artifact_uri || "–"), ...uri)];
  const button = h("button", { type: "button", class: "secondary", onclick: async () => {
    try {
      const answer = await api("GET", path.replace(/\{[^}]+\}/, encodeURIComponent(model.model_id)));
      const url = answer?.url || answer?.download_url;
      if (url) location.assign(url);
      else if (answer?.files?.length) filesDialog(model, answer.files);
      else showError("The API gave no download URL for this model.");
    } catch (error) { showError(error); }
  } }, "Download");
  return ["Download", h("span", {}, button, " ", h("code", {}, model.artifact_uri || ""), ...uri)];
}

// "+5.0%": a model's figure against its parent's (display of two API figures side by side).
function change(mine, theirs) {
  if (mine === null || mine === undefined || !Number(theirs)) return "";
  const pct = (100 * (Number(mine) - Number(theirs))) / Number(theirs);
  return `${pct > 0 ? "+" : ""}${pct.toFixed(1)}%`;
}

async function viewModel(id) {
  const [model, { models }] = await Promise.all([api("GET", `/models/${encodeURIComponent(id)}`), api("GET", "/models")]);
  const parent = model.parent_id ? await api("GET", `/models/${encodeURIComponent(model.parent_id)}`).catch(() => null) : null;
  const children = models.filter((m) => m.parent_id === model.model_id);
  const rows = [["Parameters", "parameters", params], ["Depth", "depth", (x) => x ?? "–"],
    ["Perplexity", "perplexity", fixed], ["Cost", "cost", money],
    ["Context length", "context_length", (x) => grouped(x)]].map(([label, key, show]) => {
    const mine = key === "context_length" ? model.config?.context_length : model[key];
    // A contracted model's parent was measured by its contract job on the same windows: that figure compares.
    const theirs = key === "context_length" ? parent?.config?.context_length
      : key === "perplexity" && model.parent_perplexity != null ? model.parent_perplexity : parent?.[key];
    // The parent's own catalog perplexity compares only when measured on the same windows.
    const apart = key === "perplexity" && model.parent_perplexity == null && mine != null && Number(theirs)
      && !sameWindows(model.perplexity_on, parent?.perplexity_on);
    return h("tr", {}, h("th", { scope: "row" }, label), h("td", { class: "num", "data-key": key }, show(mine)),
      parent ? h("td", { class: "num" }, show(theirs)) : null,
      parent ? h("td", { class: "num", "data-change": key }, apart ? "other windows" : change(mine, theirs)) : null);
  });
  const remove = model.kind !== "base" && model.status !== "deleted" ? h("button", { type: "button", class: "danger", onclick: () =>
    confirmDialog(`Delete ${model.model_id}?`, "Its archive is deleted. Models made from it keep it as their parent, shown as deleted.",
      "Delete the model", async () => { await api("DELETE", `/models/${encodeURIComponent(model.model_id)}`); location.hash = "#/models"; }) },
  "Delete model") : null;
  const actions = h("p", { class: "actions" },
    link(`#/jobs/new?model=${encodeURIComponent(model.model_id)}`, "Train from this model", { class: "button" }),
    model.kind !== "base" ? link(`#/models/${encodeURIComponent(model.model_id)}/contract`, "Contract this model", { class: "button secondary" }) : null,
    remove);
  render(model.name || model.model_id,
    model.status === "deleted" ? h("p", { class: "failure", "data-status": "deleted" }, `Deleted ${when(model.deleted_at)}: kept for its children's lineage.`) : null,
    pairs([["Model", h("span", {}, h("code", {}, model.model_id), " ", copyButton(model.model_id))], ["Kind", model.kind],
      ["Parent", h("span", {}, modelLink(model.parent_id), parent?.status === "deleted" ? h("span", { class: "muted", "data-parent": "deleted" }, " (deleted)") : "")],
      ["Produced by job", jobLink(model.job_id)], ["Dataset", model.dataset || "–"],
      ["Perplexity measured on", measuredOn(model.perplexity_on)], ["Created", when(model.created_at)],
      await downloadLink(model)]),
    actions,
    h("h2", {}, parent ? "Metrics, next to its parent's" : "Metrics"),
    table(["", model.model_id, parent ? `${parent.model_id} (parent)` : null, parent ? "Change" : null].filter((x) => x !== null), rows, { "aria-label": "Metrics" }),
    h("h2", {}, "Models made from it"),
    children.length ? h("ul", { "aria-label": "Children" }, children.map((c) => h("li", {}, modelLink(c.model_id), ` · ${c.kind} · ${params(c.parameters)} · perplexity ${fixed(c.perplexity)}`)))
      : h("p", { class: "empty" }, "None yet."),
    ...(model.status === "deleted" ? [] : await playground(model)));
}

// Try the model: POST /models/{id}/generate, answered by the model's endpoint (locally, by the
// model itself). A conversation keeps its turns until it is cleared.
async function playground(model) {
  const props = (await schemaOf("GenerateRequest")).properties;
  const tokensField = fieldSchema(props.max_tokens), heat = fieldSchema(props.temperature);
  const prompt = h("textarea", { id: "f-prompt", name: "prompt", rows: 3, required: true, "aria-describedby": "f-prompt-hint" });
  const chat = h("input", { id: "f-chat", name: "chat", type: "checkbox" });
  const maxTokens = h("input", { id: "f-max_tokens", name: "max_tokens", type: "number", min: tokensField.minimum,
    max: tokensField.maximum, step: 1, value: tokensField.default, inputmode: "numeric" });
  const temperature = h("input", { id: "f-temperature", name: "temperature", type: "number", min: heat.minimum,
    max: heat.maximum, step: 0.1, value: heat.default });
  const answer = h("div", { class: "answer", "aria-live": "polite", "data-testid": "answer" });
  const button = h("button", { type: "submit" }, "Generate");
  const clear = h("button", { type: "button", class: "secondary", hidden: true }, "New conversation");
  let turns = [];
  const showTurns = () => answer.replaceChildren(h("ol", { class: "turns", "aria-label": "Conversation" },
    turns.map((t) => h("li", { "data-role": t.role }, h("strong", {}, `${t.role}: `), t.content))));
  clear.addEventListener("click", () => { turns = []; answer.replaceChildren(); clear.hidden = true; });
  chat.addEventListener("change", () => { turns = []; answer.replaceChildren(); clear.hidden = true; });
  const form = h("form", { class: "playground", "aria-label": "Try the model" },
    h("div", { class: "field" }, h("label", { for: "f-prompt" }, "Prompt"), prompt,
      h("p", { class: "hint", id: "f-prompt-hint" }, "The model continues it; as a conversation, it answers it as the user's turn.")),
    h("div", { class: "field inline" }, chat, h("label", { for: "f-chat" }, "As a conversation (the model's chat template)")),
    h("div", { class: "field" }, h("label", { for: "f-max_tokens" }, "Most new tokens ", h("code", { class: "key" }, "max_tokens")), maxTokens,
      h("p", { class: "hint" }, `default ${tokensField.default} · ${rangeText(tokensField)}`)),
    h("div", { class: "field" }, h("label", { for: "f-temperature" }, "Temperature ", h("code", { class: "key" }, "temperature")), temperature,
      h("p", { class: "hint" }, `default ${heat.default} · ${rangeText(heat)} · ${heat.description || ""}`)),
    h("p", { class: "actions" }, button, clear), answer);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!prompt.value.trim() || button.hasAttribute("aria-busy")) return;
    const sent = { max_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    if (chat.checked) sent.messages = [...turns, { role: "user", content: prompt.value }];
    else sent.prompt = prompt.value;
    button.setAttribute("aria-busy", "true");
    try {
      const got = await api("POST", `/models/${encodeURIComponent(model.model_id)}/generate`, sent);
      const took = h("p", { class: "muted", "data-testid": "latency" }, `Answered in ${grouped(got.latency_ms)} ms by ${got.endpoint}.`);
      if (got.messages) {
        turns = got.messages;
        showTurns();
        answer.append(took);
        clear.hidden = false;
        prompt.value = "";
      } else {
        answer.replaceChildren(h("p", { class: "generated" }, h("span", { class: "muted" }, sent.prompt), got.text), took);
      }
    } catch (error) {
      const command = error.code === "not_deployed" ? error.message.match(/`([^`]+)`/)?.[1] : null;
      answer.replaceChildren(h("p", { class: "failure", "data-code": error.code || "error" },
        command ? error.message.replace(/ Deploy it with `[^`]+`$/, "") : error.message),
      command ? h("p", {}, "Deploy it with ", h("code", {}, command), " ", copyButton(command)) : null);
    } finally {
      button.removeAttribute("aria-busy");
    }
  });
  return [h("h2", {}, "Try it"), form];
}

// A model picker's options: the models a job may start from, those whose weights are not available
// shown but disabled; `chosen` (or the first available one) selected.
function modelOptions(models, chosen) {
  chosen = chosen || models.find((m) => m.available !== false)?.model_id;
  return models.map((m) => h("option", { value: m.model_id, selected: m.model_id === chosen, disabled: m.available === false },
    `${m.model_id} · ${params(m.parameters)} · ${m.depth} layers${m.available === false ? " · not available" : ""}`));
}

async function viewNewJob(query) {
  const [{ models }, { datasets }, schema] = await Promise.all([api("GET", "/models"), api("GET", "/datasets"),
    schemaOf("TrainSettings")]);
  const ready = datasets.filter((d) => d.status === "ready");
  const props = schema.properties;
  const form = h("form", { class: "job", novalidate: true, "aria-label": "New train job" });
  const general = h("p", { class: "error general", role: "alert" });
  const modelSelect = h("select", { id: "f-model", name: "model", "aria-describedby": "f-model-error" },
    modelOptions(models, query.get("model")));
  const datasetSelect = h("select", { id: "f-dataset", name: "dataset", "aria-describedby": "f-dataset-error" },
    ready.map((d) => h("option", { value: d.dataset_id, selected: d.dataset_id === query.get("dataset") }, `${d.name} (${d.dataset_id}) · ${tokens(d.tokens)}`)));
  const contextOf = () => models.find((m) => m.model_id === modelSelect.value)?.config?.context_length;
  const seqLimit = () => ({ max: contextOf(), maxWhy: `the context length of ${modelSelect.value}` });
  const advancedNames = ["cycles", "steps_per_cycle", "lr", "seq_len", "train_steps", "output_name"];
  const names = ["turns", ...advancedNames];
  const advanced = h("details", { class: "advanced" }, h("summary", {}, "Advanced tuning (optional)"),
    advancedNames.map((n) => settingField(n, props[n], n === "seq_len" ? seqLimit() : {})));
  const panel = h("section", { class: "estimate", "aria-live": "polite", "aria-label": "Estimate" }, h("h2", {}, "Estimate"),
    h("p", { class: "muted" }, "Choose a model and a dataset to see the price."));
  const button = h("button", { type: "submit", disabled: !ready.length }, "Start training");
  form.append(general,
    h("div", { class: "field", "data-field": "model" }, h("label", { for: "f-model" }, "Model"), modelSelect,
      h("p", { class: "hint" }, "The model to grow and train; base models are public."), h("p", { class: "error", id: "f-model-error", role: "alert" })),
    h("div", { class: "field", "data-field": "dataset" }, h("label", { for: "f-dataset" }, "Dataset"),
      ready.length ? datasetSelect : h("p", { class: "empty" }, "No ready dataset yet. ", link("#/datasets", "Upload one"), " first."),
      h("p", { class: "error", id: "f-dataset-error", role: "alert" })),
    settingField("turns", props.turns, { value: query.get("turns") }),
    advanced, h("p", { class: "actions" }, button));
  const body = () => {
    const hyperparams = readSettings(form, names);
    return { type: "train", model: modelSelect.value, dataset: ready.length ? datasetSelect.value : "", hyperparams };
  };
  const estimate = estimator(form, body, panel, general);
  modelSelect.addEventListener("change", () => {  // seq_len's range follows the model's context length
    const seq = form.querySelector("#f-seq_len");
    advanced.querySelector('[data-field="seq_len"]').replaceWith(settingField("seq_len", props.seq_len, { ...seqLimit(), value: seq.value }));
  });
  form.addEventListener("input", estimate.soon);
  form.addEventListener("change", estimate.soon);
  submitter(form, body, general, button);
  render("New train job", h("div", { class: "columns" }, form, panel));
  if (ready.length) estimate.now();
}

async function viewContract(id) {
  const [model, schema] = await Promise.all([api("GET", `/models/${encodeURIComponent(id)}`), schemaOf("ContractSettings")]);
  const props = schema.properties;
  const ratio = fieldSchema(props.contraction_ratio);
  const marks = Object.entries(ratio["x-marks"] || {});
  const form = h("form", { class: "job", novalidate: true, "aria-label": "Contract a model" });
  const general = h("p", { class: "error general", role: "alert" });
  const slider = h("input", { id: "f-contraction_ratio", name: "contraction_ratio", type: "range", min: ratio.minimum,
    max: ratio.maximum, step: 0.05, value: ratio.default, list: "ratio-marks", "aria-describedby": "f-contraction_ratio-hint" });
  const shown = h("output", { for: "f-contraction_ratio", id: "ratio-value" }, String(ratio.default));
  slider.addEventListener("input", () => { shown.textContent = slider.value; });
  const panel = h("section", { class: "estimate", "aria-live": "polite", "aria-label": "Estimate" }, h("h2", {}, "Estimate"));
  const button = h("button", { type: "submit" }, "Contract");
  form.append(general,
    h("div", { class: "field", "data-field": "contraction_ratio" },
      h("label", { for: "f-contraction_ratio" }, ...labelFor("contraction_ratio"), " ", shown), slider,
      h("datalist", { id: "ratio-marks" }, marks.map(([v, name]) => h("option", { value: v, label: name }))),
      h("div", { class: "marks", "aria-hidden": "true" }, marks.map(([v, name]) => {
        const mark = h("span", { "data-mark": v }, `${v} ${name}`);
        mark.style.left = `${(100 * (Number(v) - ratio.minimum)) / (ratio.maximum - ratio.minimum)}%`; // under its tick
        return mark;
      })),
      h("p", { class: "hint", id: "f-contraction_ratio-hint" },
        `default ${ratio.default} · range ${ratio.minimum}–${ratio.maximum} · ${ratio.description}`),
      h("p", { class: "error", role: "alert" })),
    settingField("num_layers_to_contract", props.num_layers_to_contract, { max: model.depth, maxWhy: `the depth of ${model.model_id}`, value: Math.min(fieldSchema(props.num_layers_to_contract).default, model.depth) }),
    settingField("train_steps", props.train_steps),
    settingField("output_name", props.output_name),
    h("p", { class: "actions" }, button));
  const body = () => ({ type: "contract",
    hyperparams: { source_model_id: model.model_id, ...readSettings(form, ["contraction_ratio", "num_layers_to_contract", "train_steps", "output_name"]) } });
  const estimate = estimator(form, body, panel, general);
  form.addEventListener("input", estimate.soon);
  submitter(form, body, general, button);
  render(`Contract ${model.name || model.model_id}`,
    h("p", {}, `${params(model.parameters)}, ${model.depth} layers, perplexity ${fixed(model.perplexity)}. The source is never modified.`),
    h("div", { class: "columns" }, form, panel));
  estimate.now();
}

// The settings beside "What runs" (which says turns, cycles and steps): each in words, its key after it.
const SCHEDULED = ["turns", "cycles", "steps_per_cycle", "train_steps", "num_layers_to_contract", "contraction_ratio"];
function settingsSummary(settings) {
  const shown = Object.entries(settings).filter(([k, v]) => v !== null && v !== undefined && !SCHEDULED.includes(k));
  return h("ul", { class: "settings" }, shown.map(([k, v]) =>
    h("li", { "data-setting": k }, `${LABELS[k] || k}: `, h("strong", {}, k === "source_model_id" ? modelLink(v) : String(v)), " ", h("code", { class: "key" }, k))));
}

function progressLine(p) {
  if (!p) return "Waiting for the trainer's first report…";
  const parts = [`turn ${p.turn}/${p.turns}`, `cycle ${p.cycle}/${p.cycles}`, `step ${grouped(p.step)}/${grouped(p.total_steps)}`];
  if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${fixed(p.loss, 3)}`);
  if (p.perplexity !== null && p.perplexity !== undefined) parts.push(`perplexity ${fixed(p.perplexity, 1)}`);
  if (p.eta_seconds !== null && p.eta_seconds !== undefined) parts.push(`ETA ${duration(p.eta_seconds)}`);
  return parts.join(" · ");
}

function cancelDialog(job, onDone) {
  const billed = job.status === "queued"
    ? "It has not started: nothing will be billed."
    : `It will be stopped and billed for the tokens it trained so far${job.progress ? ` (${tokens(job.progress.tokens_trained)} of ${tokens(job.estimate?.training_tokens)})` : ""}, at most the estimate of ${money(job.estimate?.total)}.`;
  const dialog = h("dialog", { "aria-labelledby": "cancel-title" },
    h("h2", { id: "cancel-title" }, `Cancel job ${job.job_id}?`), h("p", { "data-testid": "cancel-billing" }, billed),
    h("form", { method: "dialog", class: "actions" },
      h("button", { value: "no", class: "secondary" }, "Keep it running"),
      h("button", { value: "yes", class: "danger" }, "Cancel the job")));
  dialog.addEventListener("close", async () => {
    dialog.remove();
    if (dialog.returnValue !== "yes") return;
    try { await api("POST", `/jobs/${encodeURIComponent(job.job_id)}/cancel`); onDone(); } catch (error) { showError(error); }
  });
  document.body.append(dialog);
  dialog.showModal();
}

// A model a job made is its files: a link for each, named by its path in the model folder.
function filesDialog(model, files) {
  const dialog = h("dialog", { "aria-labelledby": "files-title" },
    h("h2", { id: "files-title" }, `Files of ${model.model_id}`),
    h("p", {}, "Save each file at its path to have the model folder (the transformers folder is hf/), or run ",
      h("code", {}, `fusion models download ${model.model_id} --out DIR`), "."),
    h("ul", { "data-testid": "model-files" }, ...files.map((file) =>
      h("li", {}, h("a", { href: file.url, download: file.path.split("/").pop() }, file.path), ` ${human(file.size)}B`))),
    h("form", { method: "dialog", class: "actions" }, h("button", { value: "close", class: "secondary" }, "Close")));
  dialog.addEventListener("close", () => dialog.remove());
  document.body.append(dialog);
  dialog.showModal();
}

// Copies an id or a URI; a browser that refuses the clipboard leaves the text selectable as it is.
function copyButton(text) {
  const button = h("button", { type: "button", class: "secondary copy", "aria-label": `Copy ${text}` }, "Copy");
  button.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; } catch { button.textContent = "Select it to copy"; }
  });
  return button;
}

function confirmDialog(title, words, yes, action) {
  const dialog = h("dialog", { "aria-labelledby": "confirm-title" }, h("h2", { id: "confirm-title" }, title), h("p", {}, words),
    h("form", { method: "dialog", class: "actions" }, h("button", { value: "no", class: "secondary" }, "Keep it"),
      h("button", { value: "yes", class: "danger" }, yes)));
  dialog.addEventListener("close", async () => {
    dialog.remove();
    if (dialog.returnValue === "yes") { try { await action(); } catch (error) { showError(error); } }
  });
  document.body.append(dialog);
  dialog.showModal();
}

// Which windows a perplexity was measured on, in words (the API's perplexity_on).
function measuredOn(on) {
  if (!on) return "–";
  const which = { validation: "validation windows", split: "held-out windows", dataset: "windows sampled from all" }[on.source];
  const scored = on.tokens === "assistant" ? ", the assistant's tokens scored" : "";
  return `${grouped(on.windows)} ${which} of ${grouped(on.seq_len)} tokens of ${on.dataset || "–"}${scored}`;
}

// Two perplexities compare only when measured on the same windows: equal digests (from the API).
function sameWindows(a, b) {
  return Boolean(a?.sha256) && a.sha256 === b?.sha256;
}

// An evaluate job's table: its models side by side on the same windows, as the API recorded them.
function evaluationResult(job) {
  const table_ = job.type === "evaluate" ? job.evaluation : null;
  if (!table_ || !table_.rows.length) return null;
  const first = table_.rows[0].perplexity_on;
  const chat = table_.rows.some((r) => r.perplexity_on.tokens === "assistant");
  const rows = table_.rows.map((r) => h("tr", { "data-model": r.model_id },
    h("td", {}, modelLink(r.model_id)), h("td", { class: "num" }, params(r.parameters)),
    h("td", { class: "num", "data-key": "perplexity" }, fixed(r.perplexity)), h("td", { class: "num" }, fixed(r.loss, 4)),
    h("td", { class: "num" }, grouped(r.target_tokens)),
    h("td", {}, h("code", {}, (r.perplexity_on.sha256 || "–").slice(0, 12)),
      sameWindows(r.perplexity_on, first) ? "" : " (other windows)")));
  return [h("h2", {}, "Evaluation"),
    h("p", {}, `Every model on the same ${measuredOn(first)}; ${grouped(table_.evaluated_tokens)} tokens evaluated.`),
    table(["Model", "Parameters", "Perplexity", chat ? "Assistant loss" : "Loss", "Tokens scored", "Windows"], rows,
      { "aria-label": "Evaluation" })];
}

async function contractResult(job) {
  if (job.type !== "contract" || job.status !== "completed" || !job.output_model_id) return null;
  const [before, after] = await Promise.all([api("GET", `/models/${encodeURIComponent(job.model)}`),
    api("GET", `/models/${encodeURIComponent(job.output_model_id)}`)]);
  return [h("h2", {}, "Result"), table(["", "Before", "After"], [
    h("tr", {}, h("th", { scope: "row" }, "Model"), h("td", {}, modelLink(before.model_id)), h("td", {}, modelLink(after.model_id))),
    h("tr", {}, h("th", { scope: "row" }, "Parameters"), h("td", { class: "num" }, params(before.parameters)), h("td", { class: "num", "data-key": "after-parameters" }, params(after.parameters))),
    h("tr", {}, h("th", { scope: "row" }, "Depth"), h("td", { class: "num" }, before.depth), h("td", { class: "num" }, after.depth)),
    h("tr", {}, h("th", { scope: "row" }, "Perplexity"), h("td", { class: "num" }, fixed(after.parent_perplexity ?? before.perplexity)), h("td", { class: "num", "data-key": "after-perplexity" }, fixed(after.perplexity))),
  ], { "aria-label": "Before and after" }),
  after.perplexity_on ? h("p", { class: "muted" }, `Both perplexities on ${measuredOn(after.perplexity_on)}.`) : null];
}

async function viewJob(id) {
  const status = h("p", { class: "status" });
  const progress = h("progress", { max: 1, value: 0, "aria-label": "Progress" });
  const line = h("p", { class: "progress-line", "aria-live": "polite" });
  const charts = h("div", { class: "charts" });
  const details = h("div");
  const result = h("div");
  const cancel = h("button", { type: "button", class: "danger" }, "Cancel job");
  render(`Job ${id}`, status, h("div", { class: "progress-box" }, progress, line), h("p", { class: "actions" }, cancel),
    h("h2", {}, "Training curve"), charts, details, result);
  let job = null, ended = false, dataset = null;
  cancel.addEventListener("click", () => job && cancelDialog(job, refresh));
  async function refresh() {
    if (ended) return;
    const [latest, curve] = await Promise.all([api("GET", `/jobs/${encodeURIComponent(id)}`),
      api("GET", `/jobs/${encodeURIComponent(id)}/metrics`)]);
    job = latest;
    const p = job.progress;
    dataset = dataset || (job.dataset?.startsWith("ds-")
      ? await api("GET", `/datasets/${encodeURIComponent(job.dataset)}`).catch(() => null) : null);
    status.replaceChildren(badge(job.status), ` ${job.type} of `,
      ...(job.models ? job.models.flatMap((m, i) => [i ? ", " : "", modelLink(m)]) : [modelLink(job.model)]), " on ",
      dataset ? link("#/datasets", `${dataset.name}${dataset.status === "deleted" ? " (deleted)" : ""}`) : job.dataset || "–",
      job.settings?.output_name ? ` → ${job.settings.output_name}` : "",
      job.output_model_id ? h("span", {}, " (", modelLink(job.output_model_id), ")") : "");
    // Where the job is, or where it stopped: a cancelled job keeps its last reported step.
    const at = p || (job.status === "completed" ? null : job.stopped);
    if (at) { progress.max = at.total_steps || 1; progress.value = at.step || 0; }
    else if (job.status === "completed") { progress.max = 1; progress.value = 1; }
    const took = `${when(job.updated_at)}, after ${duration((Date.parse(job.updated_at) - Date.parse(job.created_at)) / 1000)}.`;
    line.textContent = ACTIVE.includes(job.status) ? progressLine(p)
      : at ? `${job.status === "cancelled" ? "Cancelled" : `Ended ${job.status}`} at step ${grouped(at.step)} of ${grouped(at.total_steps)}, ${took}`
        : `Ended ${job.status}, ${took}`;
    cancel.hidden = !ACTIVE.includes(job.status) || job.status === "cancelling";
    const logged = curve.steps.length || curve.evals.length;
    charts.replaceChildren(...(logged || ACTIVE.includes(job.status) ? [
      lineChart({ title: "Training loss per step", xLabel: "step", yLabel: "loss", cls: "loss",
        points: curve.steps.map((r) => [r.step, r.loss]) }),
      lineChart({ title: "Held-out perplexity per cycle", xLabel: "step", yLabel: "perplexity", cls: "perplexity",
        points: curve.evals.filter((r) => r.perplexity !== null).map((r) => [r.step, r.perplexity]) }),
    ] : [h("p", { class: "empty" }, "This job logged no training steps.")]));
    const e = job.estimate || {};
    details.replaceChildren(h("h2", {}, "Estimate and bill"), pairs([
      ["Job", h("span", {}, h("code", {}, job.job_id), " ", copyButton(job.job_id))],
      e.evaluated_tokens
        ? ["Estimate", `${money(e.total)} for ${tokens(e.evaluated_tokens)} evaluated, forward only (largest model ${params(e.parameters)}, tier ${e.tier})`, "estimate"]
        : ["Estimate", `${money(e.total)} for ${tokens(e.training_tokens)} billed (${params(e.parameters)}, tier ${e.tier})`, "estimate"],
      e.trained_tokens ? ["Trained tokens", `${tokens(e.trained_tokens)}: ${e.sequences_per_step} sequences a step`] : null,
      ["ETA on AWS when priced", `${duration(e.eta_seconds)} on ${e.instance_count} × ${e.instance_type}`],
      ["Bill", job.bill !== null && job.bill !== undefined ? h("strong", {}, money(job.bill)) : "when the job ends", "bill"],
      job.failure_reason ? ["Failure reason", h("span", { class: "failure" }, job.failure_reason), "failure"] : null,
      ["What runs", job.schedule || "–", "schedule"],
      ["Settings", settingsSummary(job.settings || {}), "settings"],
      ...(job.warnings || []).map((w) => ["Warning", w]),
      ["Created", when(job.created_at)],
    ]));
    if (!ACTIVE.includes(job.status)) {
      ended = true;
      result.replaceChildren(...((await contractResult(job)) || evaluationResult(job) || []));
    }
  }
  await refresh();
  every(POLL_MS, () => refresh().then(clearError, showError));
}

const FILTERS = { all: null, active: ACTIVE, completed: ["completed"], failed: ["failed"], cancelled: ["cancelled"] };

async function viewJobs(query) {
  const filter = FILTERS[query.get("status")] !== undefined ? query.get("status") || "all" : "all";
  const tabs = h("nav", { class: "filters", "aria-label": "Status filter" }, Object.keys(FILTERS).map((name) =>
    link(name === "all" ? "#/jobs" : `#/jobs?status=${name}`, name, { "aria-current": name === filter ? "true" : undefined })));
  const holder = h("div", { "aria-live": "polite" });
  render("Jobs", tabs, holder, h("p", {}, link("#/jobs/new", "New train job")));
  async function refresh() {
    const { jobs } = await api("GET", "/jobs");
    const shown = FILTERS[filter] ? jobs.filter((j) => FILTERS[filter].includes(j.status)) : jobs;
    if (!shown.length) {
      holder.replaceChildren(h("p", { class: "empty" }, jobs.length ? `No ${filter} jobs.` : "No jobs yet. ",
        jobs.length ? "" : link("#/jobs/new", "Start a train job"), jobs.length ? "" : " to see it here."));
      return;
    }
    holder.replaceChildren(table(["Job", "Name", "Type", "Status", "Model", "Dataset", "Progress", "Estimate", "Bill", "Output", "Created", "Took"],
      shown.map((j) => h("tr", { "data-job": j.job_id }, h("td", {}, jobLink(j.job_id)), h("td", {}, j.settings?.output_name || "–"),
        h("td", {}, j.type), h("td", {}, badge(j.status)),
        h("td", {}, modelLink(j.model)), h("td", {}, j.dataset || "–"),
        h("td", {}, j.progress ? `step ${grouped(j.progress.step)}/${grouped(j.progress.total_steps)}`
          : j.stopped ? `stopped at ${grouped(j.stopped.step)}/${grouped(j.stopped.total_steps)}` : "–"),
        h("td", { class: "num" }, money(j.estimate?.total)), h("td", { class: "num" }, money(j.bill)),
        h("td", {}, modelLink(j.output_model_id)), h("td", {}, when(j.created_at)),
        h("td", { class: "num" }, ACTIVE.includes(j.status) ? "–" : duration((Date.parse(j.updated_at) - Date.parse(j.created_at)) / 1000)))),
    { "aria-label": "Jobs" }));
    active = jobs.some((j) => ACTIVE.includes(j.status));
  }
  let active = false, last = 0;
  await refresh();
  // Every 2 s while a job can still move, every 10 s otherwise (a job started elsewhere shows).
  every(POLL_MS, () => {
    if (!active && Date.now() - last < IDLE_POLL_MS) return null;
    last = Date.now();
    return refresh().then(clearError, showError);
  });
}

async function viewDatasets() {
  const schema = await schemaOf("CreateDatasetRequest");
  const formats = schema.properties.format.enum || [schema.properties.format.default];
  const list = h("div", { "aria-live": "polite" });
  const file = h("input", { id: "f-file", name: "file", type: "file", accept: ".jsonl,.txt,.json,text/plain" });
  const name = h("input", { id: "f-name", name: "name", type: "text", pattern: htmlPattern(schema.properties.name.pattern),
    "aria-describedby": "f-name-hint" });
  const format = h("select", { id: "f-format", name: "format" }, formats.map((f) => h("option", { value: f, selected: f === schema.properties.format.default }, f)));
  const bar = h("progress", { max: 100, value: 0, "aria-label": "Upload progress", hidden: true });
  const state = h("p", { class: "upload-state", role: "status" });
  const zone = h("div", { class: "drop", "data-testid": "drop" },
    h("label", { for: "f-file" }, "Drop a file here, or choose one"), file,
    h("p", { class: "hint" }, schema.properties.format.description));
  const form = h("form", { class: "upload", "aria-label": "Upload a dataset" }, zone,
    h("div", { class: "field" }, h("label", { for: "f-name" }, "Name"), name, h("p", { class: "hint", id: "f-name-hint" }, schema.properties.name.description)),
    h("div", { class: "field" }, h("label", { for: "f-format" }, "Format"), format),
    h("p", { class: "actions" }, h("button", { type: "submit" }, "Upload")), bar, state);
  const pick = (chosen) => {
    if (!chosen) return;
    if (!name.value) name.value = chosen.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64);
    format.value = /\.jsonl?$/i.test(chosen.name) ? "jsonl" : formats.includes("text") ? "text" : format.value;
    state.textContent = `${chosen.name}: ${human(chosen.size)}B, ready to upload.`;
  };
  let dropped = null;
  file.addEventListener("change", () => { dropped = null; pick(file.files[0]); });
  for (const kind of ["dragenter", "dragover"]) zone.addEventListener(kind, (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); dropped = e.dataTransfer.files[0]; pick(dropped); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = dropped || file.files[0];
    if (!chosen) { state.textContent = "Choose or drop a file first."; return; }
    try {
      const created = await api("POST", "/datasets", { name: name.value, format: format.value });
      bar.hidden = false; bar.value = 0;
      state.textContent = `Uploading ${chosen.name}…`;
      await put(created.upload_url, chosen, (pct) => { bar.value = pct; });
      state.textContent = "Uploaded; checking it…";
      let dataset = created;
      for (let i = 0; i < 120 && dataset.status === "pending"; i++) {
        await new Promise((r) => setTimeout(r, 1000));
        dataset = await api("GET", `/datasets/${encodeURIComponent(created.dataset_id)}`);
      }
      state.replaceChildren(dataset.status === "ready"
        ? h("span", { class: "ok", "data-status": "ready" }, `Ready: ${dataset.name}, ${tokens(dataset.tokens)}. `, link(`#/jobs/new?dataset=${encodeURIComponent(dataset.dataset_id)}`, "Train on it"))
        : h("span", { class: "failure", "data-status": dataset.status }, dataset.status === "pending" ? "Still being checked; see the list below." : `${dataset.status[0].toUpperCase()}${dataset.status.slice(1)}: ${dataset.reason}`));
      await refresh();
    } catch (error) {
      if (error.details?.length) state.textContent = error.details.map((d) => `${d.field}: ${d.message}`).join("; ");
      else showError(error);
    }
  });
  async function refresh() {
    const { datasets } = await api("GET", "/datasets");
    list.replaceChildren(datasets.length
      ? table(["Dataset", "Name", "Status", "Size", "Tokens", "Created", "Reason", ""], datasets.map((d) => h("tr", { "data-dataset": d.dataset_id },
        h("td", {}, d.dataset_id), h("td", {}, d.name), h("td", {}, badge(d.status)), h("td", { class: "num" }, d.bytes === null ? "–" : `${human(d.bytes)}B`),
        h("td", { class: "num" }, tokens(d.tokens)), h("td", {}, when(d.created_at)), h("td", {}, d.reason || ""),
        h("td", {}, h("button", { type: "button", class: "secondary", "aria-label": `Delete ${d.name}`, onclick: () =>
          confirmDialog(`Delete ${d.name}?`, "Its data is deleted; models trained on it keep its name.", "Delete the dataset",
            async () => { await api("DELETE", `/datasets/${encodeURIComponent(d.dataset_id)}`); await refresh(); }) }, "Delete")))),
      { "aria-label": "Datasets" })
      : h("p", { class: "empty" }, "No datasets yet. Upload a JSONL file with a \"text\" field per line, or UTF-8 text."));
  }
  render("Datasets", form, h("h2", {}, "Your datasets"), list);
  await refresh();
}

// The presigned PUT, with progress (fetch reports no upload progress).
function put(url, blob, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(Math.round((100 * e.loaded) / e.total)); });
    xhr.addEventListener("load", () => (xhr.status < 300 ? (onProgress(100), resolve()) : reject(new ApiError(xhr.status, null, `The upload was refused (HTTP ${xhr.status}).`))));
    xhr.addEventListener("error", () => reject(new ApiError(0, null, "The upload could not reach the data bucket.")));
    xhr.send(blob);
  });
}

// ---- routing --------------------------------------------------------------------------------

const ROUTES = [
  [/^#\/?$/, () => viewHome()],
  [/^#\/models\/([^/]+)\/contract$/, (m) => viewContract(decodeURIComponent(m[1]))],
  [/^#\/models\/([^/]+)$/, (m) => viewModel(decodeURIComponent(m[1]))],
  [/^#\/models$/, () => viewModels()],
  [/^#\/jobs\/new$/, (m, q) => viewNewJob(q)],
  [/^#\/jobs\/([^/]+)$/, (m) => viewJob(decodeURIComponent(m[1]))],
  [/^#\/jobs$/, (m, q) => viewJobs(q)],
  [/^#\/datasets$/, () => viewDatasets()],
  ...tuneRoutes({ h, link, badge, table, pairs, render, every, debounce, newKey, showError, modelOptions }),
];

async function route() {
  for (const stop of timers) stop();
  timers = [];
  for (const dialog of document.querySelectorAll("dialog")) dialog.remove();
  const [path, search] = (location.hash || "#/").split("?");
  const query = new URLSearchParams(search || "");
  for (const a of document.querySelectorAll("header nav a")) {
    a.toggleAttribute("aria-current", a.getAttribute("href") === path);
  }
  const found = ROUTES.map(([re, view]) => [path.match(re), view]).find(([m]) => m);
  clearError();
  main.setAttribute("aria-busy", "true");
  try {
    if (found) await found[1](found[0], query);
    else render("Not found", h("p", {}, "No such page. ", link("#/models", "Go to the catalog")));
  } catch (error) {
    showError(error);
    const words = error.status === 404 ? "It does not exist, or it is not yours." : "The page could not be loaded.";
    const retry = h("button", { type: "button", onclick: () => route() }, "Retry");
    render("Something went wrong", h("p", { class: "empty" }, `${words} ${error.message} `, link("#/models", "Back to the catalog")),
      error.status === 404 ? null : h("p", { class: "actions" }, retry));
    // An outage ends by itself: the page tries again, as a job's page does, until it loads.
    if (error.status !== 404) every(RETRY_MS, () => api("GET", "/console/config.json").then(() => route(), () => null));
  } finally {
    main.removeAttribute("aria-busy");
    if (document.activeElement === document.body) main.focus({ preventScroll: true });
  }
}

async function start() {
  try {
    const session = await ready();
    if (session.signedIn) {
      document.getElementById("who").replaceChildren(h("button", { type: "button", class: "secondary", onclick: session.signOut }, "Sign out"));
    }
  } catch (error) {
    showError(error);
    render("Cannot start", h("p", { class: "empty" }, `${error.message} Reload the page to try again.`));
    return;
  }
  if (!location.hash) history.replaceState(null, "", "#/");
  // One view at a time: a view still loading when the address changes finishes (and has its
  // timers stopped) before the next one renders, so the page always shows the latest address.
  let routing = route();
  addEventListener("hashchange", () => { routing = routing.then(route); });
  await routing;
}

start();
