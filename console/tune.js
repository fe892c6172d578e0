// The Tune page: start a tuning (priced live), follow it, see its trials ranked with each one's
// full run, and promote the winner to a train job. Every figure comes from the Fusion API
// (POST/GET /tunings, /tunings/{id}/promote); the page is given the console's DOM and routing functions.

import { api } from "/console/api.js";
import { duration, fixed, money, when } from "/console/format.js";

const ENDED = ["completed", "failed", "cancelled"];
const TUNABLE = { lr: "log scale", steps_per_cycle: "", cycles: "", turns: "" };

export function tuneRoutes(ui) {
  return [
    [/^#\/tunings\/([^/]+)$/, (m) => viewTuning(ui, decodeURIComponent(m[1]))],
    [/^#\/tunings$/, () => viewTunings(ui)],
  ];
}

const tuningLink = (ui, id) => ui.link(`#/tunings/${encodeURIComponent(id)}`, id);

function formBody(form) {
  const data = new FormData(form);
  const body = { model: data.get("model"), dataset: data.get("dataset"), settings: {}, ranges: {} };
  for (const name of Object.keys(TUNABLE)) {
    const low = data.get(`${name}_min`), high = data.get(`${name}_max`);
    if (low !== "" || high !== "") body.ranges[name] = { min: Number(low), max: Number(high) };
  }
  if (!Object.keys(body.ranges).length) delete body.ranges;
  for (const key of ["max_trials", "max_parallel_trials", "proxy_fraction", "budget_usd"]) {
    if (data.get(key) !== "") body[key] = Number(data.get(key));
  }
  if (data.get("seq_len") !== "") body.settings.seq_len = Number(data.get("seq_len"));
  return body;
}

async function viewTunings(ui) {
  const { h } = ui;
  const [{ tunings }, { models }, { datasets }] = await Promise.all([
    api("GET", "/tunings"), api("GET", "/models"), api("GET", "/datasets")]);
  const quote = h("p", { class: "estimate", "aria-live": "polite" }, "Fill in the form to see the price.");
  const field = (label, name, attrs = {}) => h("label", {}, label, h("input", { name, ...attrs }));
  const form = h("form", { class: "tune", novalidate: true },
    h("label", {}, "Base model", h("select", { name: "model", required: true },
      ui.modelOptions(models.filter((m) => m.kind === "base" || m.kind === "imported")))),
    h("label", {}, "Dataset", h("select", { name: "dataset", required: true },
      datasets.filter((d) => d.status === "ready").map((d) => h("option", { value: d.dataset_id }, `${d.name} (${d.dataset_id})`)))),
    h("fieldset", {}, h("legend", {}, "Ranges to search (empty: lr 3e-5..1e-3 and turns 1..2)"),
      Object.entries(TUNABLE).map(([name, note]) => h("div", { class: "range" },
        field(`${name} min${note ? ` (${note})` : ""}`, `${name}_min`, { inputmode: "decimal" }),
        field(`${name} max`, `${name}_max`, { inputmode: "decimal" })))),
    field("Trials", "max_trials", { type: "number", min: 1, placeholder: "5" }),
    field("At a time", "max_parallel_trials", { type: "number", min: 1, placeholder: "2" }),
    field("Share of the full run each trial trains", "proxy_fraction", { inputmode: "decimal", placeholder: "0.05" }),
    field("seq_len", "seq_len", { type: "number", placeholder: "256" }),
    field("Budget (USD, optional)", "budget_usd", { inputmode: "decimal" }),
    quote,
    h("button", { type: "submit" }, "Start tuning"));
  let key = ui.newKey();
  const price = ui.debounce(async () => {
    try {
      const q = await api("POST", "/tunings?dry_run=true", formBody(form));
      quote.textContent = `${q.tuning.max_trials} trials at ${Math.round(q.tuning.proxy_fraction * 100)}% of the run: ` +
        `at most ${money(q.estimate.total)}, about ${duration(q.estimate.eta_seconds)}` +
        (q.allowed_to_proceed ? "" : ` — over your budget (${money(q.budget.remaining)} left)`);
    } catch (error) {
      quote.textContent = error.message;
    }
  }, 350);
  form.addEventListener("input", () => { key = ui.newKey(); price(); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const made = await api("POST", "/tunings", formBody(form), { "idempotency-key": key });
      location.hash = `#/tunings/${encodeURIComponent(made.tuning_id)}`;
    } catch (error) {
      ui.showError(error);
    }
  });
  price();
  const rows = tunings.map((t) => h("tr", {}, h("td", {}, tuningLink(ui, t.tuning_id)), h("td", {}, ui.badge(t.status)),
    h("td", {}, t.model), h("td", {}, `${t.trials.length}/${t.max_trials}`), h("td", {}, money(t.estimate.total)),
    h("td", {}, t.bill === null ? "–" : money(t.bill)), h("td", {}, when(t.created_at))));
  ui.render("Tune", h("p", {}, "Short proxy trials of the full run, ranked by held-out perplexity; promote the best."),
    form, h("h2", {}, "Your tunings"),
    tunings.length ? ui.table(["Tuning", "Status", "Model", "Trials", "Price", "Bill", "Started"], rows)
      : h("p", { class: "empty" }, "No tuning yet."));
}

async function viewTuning(ui, id) {
  const { h } = ui;
  const t = await api("GET", `/tunings/${encodeURIComponent(id)}`);
  const searched = Object.keys(t.ranges);
  const promote = (trial) => async () => {
    try {
      const job = await api("POST", `/tunings/${encodeURIComponent(id)}/promote`, { trial }, { "idempotency-key": `${id}-${trial}` });
      location.hash = `#/jobs/${encodeURIComponent(job.job_id)}`;
    } catch (error) {
      ui.showError(error);
    }
  };
  const rows = t.trials.map((x) => h("tr", { "data-trial": x.name },
    h("td", {}, String(x.rank)), h("td", {}, x.name.split("-").slice(-2, -1)[0]),
    searched.map((k) => h("td", {}, k === "lr" ? Number(x.settings[k]).toExponential(2) : String(x.settings[k]))),
    h("td", {}, fixed(x.perplexity)), h("td", {}, (x.curve || []).map((p) => fixed(p, 1)).join(" → ") || "–"),
    h("td", {}, x.status + (x.early_stopped ? " (stopped early)" : "")), h("td", {}, money(x.cost)),
    h("td", {}, x.full_run ? `${money(x.full_run.total)}, ${duration(x.full_run.eta_seconds)}` : "–"),
    h("td", {}, x.status === "completed" ? h("button", { type: "button", onclick: promote(x.name) }, "Promote") : "")));
  ui.render(`Tuning ${t.tuning_id}`,
    ui.pairs([["Status", ui.badge(t.status)], ["Model", t.model], ["Dataset", t.dataset],
      ["Searched", searched.map((k) => `${k} ${t.ranges[k].min}..${t.ranges[k].max}`).join(", ")],
      ["Trials", `${t.trials.length} of at most ${t.max_trials}, ${t.max_parallel_trials} at a time, each ` +
        `${Math.round(t.proxy_fraction * 100)}% of its full run`],
      ["Price", money(t.estimate.total)], ["Bill", t.bill === null ? "–" : money(t.bill)],
      t.failure_reason && ["Reason", t.failure_reason]]),
    t.trials.length
      ? ui.table(["#", "Trial", ...searched, "Held-out perplexity", "Curve", "Status", "Cost", "Full run", ""], rows)
      : h("p", { class: "empty" }, ENDED.includes(t.status) ? "No trial ran." : "The trials are running; this page updates."));
  if (!ENDED.includes(t.status)) {
    ui.every(2000, async () => {
      const now = await api("GET", `/tunings/${encodeURIComponent(id)}`);
      if (now.status !== t.status) viewTuning(ui, id);
    });
  }
}
