// trainserve dashboard: one page, routed by the URL fragment, talking to the JSON API.
// Plain ES modules; everything it needs is served by the API (see app/api/routes/ui.py).

import { PALETTE, barChart, formatValue, lineChart } from "/ui/static/charts.js";

const KEY_NAME = "trainserve.apiKey";
const main = document.getElementById("main");
let cleanups = []; // stops the current page's timers and streams when the route changes

// ---------------------------------------------------------------- small helpers

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function toast(message, isError = false) {
  const box = h("div", { class: isError ? "msg error" : "msg", text: message });
  document.getElementById("toast").append(box);
  setTimeout(() => box.remove(), isError ? 8000 : 4000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
const num = (v, d = 4) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  const s = Math.round(seconds);
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return hh ? `${hh}:${String(mm).padStart(2, "0")}:${ss}` : `${mm}:${ss}`;
}

function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

function badge(status) {
  return h("span", { class: `badge ${status}`, text: status });
}

// ---------------------------------------------------------------- API access and the key

function apiKey() {
  return localStorage.getItem(KEY_NAME) || sessionStorage.getItem(KEY_NAME) || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

let keyPrompt = null;
function askForKey(message) {
  // One dialog at a time; every request waiting on a key resumes when it closes.
  if (keyPrompt) return keyPrompt;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  const error = document.getElementById("key-error");
  error.hidden = !message;
  error.textContent = message || "";
  input.value = "";
  keyPrompt = new Promise((resolve) => {
    const done = () => {
      dialog.removeEventListener("close", done);
      keyPrompt = null;
      resolve(apiKey());
    };
    dialog.addEventListener("close", done);
  });
  dialog.showModal();
  input.focus();
  return keyPrompt;
}

function setupKeyDialog() {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-form").addEventListener("submit", () => {
    const key = document.getElementById("key-input").value.trim();
    const remember = document.getElementById("key-remember").checked;
    localStorage.removeItem(KEY_NAME);
    sessionStorage.removeItem(KEY_NAME);
    (remember ? localStorage : sessionStorage).setItem(KEY_NAME, key);
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_NAME);
    sessionStorage.removeItem(KEY_NAME);
    dialog.close();
    toast("API key forgotten");
  });
  document.getElementById("key-button").addEventListener("click", () => askForKey().then(() => route()));
}

class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.detail = detail;
  }
}

function describe(detail) {
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
  }
  return String(detail);
}

// fetch with the key; a 401 asks for a key and tries again.
async function request(path, options = {}) {
  for (let attempt = 0; attempt < 4; attempt++) {
    const response = await fetch(path, { ...options, headers: authHeaders(options.headers) });
    if (response.status === 401) {
      const had = apiKey();
      await askForKey(had ? "That key was refused; try another." : "");
      continue;
    }
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail; } catch { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return response;
  }
  throw new ApiError(401, "no valid API key");
}

const api = async (path, options) => (await request(path, options)).json();
const postJson = (path, body) => api(path, {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
});

// A binary resource (thumbnail, checkpoint) as an object URL, since <img src> cannot send the key.
const blobUrls = new Map();
async function blobUrl(path) {
  if (blobUrls.has(path)) return blobUrls.get(path);
  const url = URL.createObjectURL(await (await request(path)).blob());
  blobUrls.set(path, url);
  return url;
}

async function download(path, filename) {
  const response = await request(path);
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = disposition.match(/filename="([^"]+)"/);
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: (match && match[1]) || filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// Server-sent events over fetch (EventSource cannot send the Authorization header). Reconnects with
// Last-Event-ID after a drop, so no epoch row or log line is missed; resolves at the `end` event.
async function followEvents(jobId, onEvent, signal) {
  let last = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const headers = last ? { "Last-Event-ID": last } : {};
      const response = await fetch(`/jobs/${jobId}/events`, { headers: authHeaders(headers), signal });
      if (response.status === 401) { await askForKey(); continue; }
      if (!response.ok) throw new ApiError(response.status, (await response.json()).detail);
      failures = 0;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const event = { event: "message", data: [], id: null };
          for (const line of block.split("\n")) {
            if (!line || line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = line.slice(0, colon);
            const text = line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") event.event = text;
            else if (field === "data") event.data.push(text);
            else if (field === "id") event.id = text;
          }
          if (!event.data.length) continue;
          if (event.id) last = event.id;
          onEvent(event.event, JSON.parse(event.data.join("\n")));
          if (event.event === "end") return;
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status === 404) throw error;
      failures += 1;
    }
    await sleep(Math.min(500 + failures * 1000, 5000));
  }
}

// ---------------------------------------------------------------- shared widgets

function progressBar(job, big = false) {
  const p = job.progress || {};
  let fraction = p.fraction;
  if (job.status === "succeeded") fraction = 1;
  const inner = h("div", { class: `bar-inner ${job.status}` });
  inner.style.width = `${Math.round((fraction || 0) * 100)}%`;
  const bits = [];
  const phase = ["succeeded", "failed", "cancelled"].includes(job.status) ? job.status : p.phase || job.status;
  bits.push(phase);
  if (p.epoch) bits.push(`epoch ${p.epoch}/${p.epochs || job.spec.epochs}`);
  if (p.batches && job.status === "running") bits.push(`batch ${p.batch || 0}/${p.batches}`);
  if (phase === "caching" && p.total) bits.push(`${p.done || 0}/${p.total} images`);
  if (fraction !== undefined && fraction !== null) bits.push(`${Math.round(fraction * 100)}%`);
  if (job.status === "running" && p.eta_seconds !== undefined && p.eta_seconds !== null) {
    bits.push(`ETA ${duration(p.eta_seconds)}`);
  }
  if (job.status === "running" && p.images_per_second) bits.push(`${Math.round(p.images_per_second)} img/s`);
  return h("div", { class: big ? "progress-big" : "", dataset: { fraction: fraction ?? "" } },
    h("div", { class: "bar-outer" }, inner),
    h("div", { class: "progress-text", text: bits.join(" · ") }));
}

function dropZone({ text, accept, multiple, onFiles, id }) {
  const input = h("input", { type: "file", accept, multiple });
  const zone = h("div", { class: "dropzone", id, tabindex: 0 }, h("div", { text }),
    h("div", { class: "muted", text: "drop here, or click to choose" }), input);
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => { if (input.files.length) onFiles([...input.files]); input.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const files = [...(e.dataTransfer?.files || [])];
    if (files.length) onFiles(files);
  });
  return zone;
}

function page(title, ...children) {
  main.replaceChildren(h("h1", { text: title }), ...children);
}

function fail(error) {
  main.append(h("div", { class: "panel error", text: describe(error.detail ?? error.message) }));
}

// ---------------------------------------------------------------- datasets

async function datasetsPage() {
  const datasets = await api("/datasets");
  const name = h("input", { placeholder: "name, e.g. pets", required: true, id: "new-dataset-name" });
  const form = h("form", { class: "toolbar", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const created = await postJson("/datasets", { name: name.value.trim() });
      location.hash = `#/datasets/${created.id}`;
    } catch (error) { toast(describe(error.detail), true); }
  } }, name, h("button", { type: "submit", text: "Create dataset" }));
  const cards = datasets.map((d) => h("a", { class: "card", href: `#/datasets/${d.id}` },
    h("div", { class: "muted", text: `dataset ${d.id}` }),
    h("h2", { text: d.name }),
    h("div", { class: "big", text: `${d.num_images} images` }),
    h("div", { class: "muted", text: `${d.classes.length} classes: ${d.classes.map((c) => c.name).slice(0, 8).join(", ")}${d.classes.length > 8 ? "…" : ""}` })));
  page("Datasets", h("div", { class: "panel" }, form),
    cards.length ? h("div", { class: "cards" }, cards) : h("p", { class: "muted", text: "No datasets yet: create one, then drop images or a zip on it." }));
}

let lastUpload = null; // the summary of the latest upload, shown after the page redraws

async function datasetPage(id) {
  const dataset = await api(`/datasets/${id}`);
  const label = h("input", { placeholder: "class name", id: "upload-label" });
  const result = h("div", { id: "upload-result", class: "muted" });

  async function upload(files) {
    const zips = files.filter((f) => f.name.toLowerCase().endsWith(".zip"));
    const images = files.filter((f) => !f.name.toLowerCase().endsWith(".zip"));
    const summaries = [];
    try {
      for (const zip of zips) {
        const body = new FormData();
        body.append("file", zip);
        result.textContent = `uploading ${zip.name}…`;
        summaries.push(await api(`/datasets/${id}/archive`, { method: "POST", body }));
      }
      if (images.length) {
        if (!label.value.trim()) {
          toast("Type the class name of these images first (a zip needs none: its folders are the classes).", true);
          label.focus();
        } else {
          const body = new FormData();
          body.append("label", label.value.trim());
          images.forEach((f) => body.append("files", f));
          result.textContent = `uploading ${images.length} image(s)…`;
          summaries.push(await api(`/datasets/${id}/images`, { method: "POST", body }));
        }
      }
    } catch (error) {
      result.textContent = "";
      toast(describe(error.detail), true);
      return;
    }
    if (!summaries.length) return;
    const added = summaries.reduce((a, s) => a + s.added, 0);
    lastUpload = {
      dataset: id, added, duplicates: summaries.reduce((a, s) => a + s.duplicates, 0),
      rejected: summaries.flatMap((s) => s.rejected),
    };
    toast(`added ${added} image(s)`);
    route(); // redraw counts and thumbnails; the summary is shown again below the drop zone
  }
  if (lastUpload && lastUpload.dataset === id) {
    const { added, duplicates, rejected } = lastUpload;
    result.replaceChildren(
      h("div", { text: `last upload: added ${added}, duplicates ${duplicates}, rejected ${rejected.length}` }),
      ...rejected.slice(0, 10).map((r) => h("div", { class: "error", text: `${r.filename}: ${r.reason}` })));
  }

  const max = Math.max(1, ...dataset.classes.map((c) => c.count));
  const counts = h("div", { class: "counts" }, dataset.classes.map((c) => {
    const bar = h("div", { class: "count-bar" });
    bar.style.width = `${(100 * c.count) / max}%`;
    return h("div", { class: "count-row" }, h("span", { text: c.name }), h("div", {}, bar), h("span", { class: "num", text: c.count }));
  }));
  const splits = Object.entries(dataset.splits || {}).map(([k, v]) => `${k} ${v}`).join(" · ");
  const grid = h("div", { id: "thumb-grid" });
  page(`Dataset ${dataset.id}: ${dataset.name}`,
    h("div", { class: "row" },
      h("div", { class: "panel grow" },
        h("h2", { text: `${dataset.num_images} images in ${dataset.classes.length} classes` }),
        h("p", { class: "muted", text: splits ? `splits: ${splits}` : "" }),
        counts,
        h("p", {}, h("a", { class: "button", href: `#/jobs/new?dataset=${dataset.id}`, text: "Train a model on it" }))),
      h("div", { class: "panel grow" },
        h("h2", { text: "Add images" }),
        dropZone({ id: "dataset-drop", text: "Drop a zip (class/image.png, optionally under train/ val/ test/) or image files",
          accept: ".zip,image/*", multiple: true, onFiles: upload }),
        h("label", { class: "inline" }, "Class of dropped image files: ", label),
        result)),
    h("div", { class: "panel" }, h("h2", { text: "Samples per class" }), grid));

  // Thumbnails: a dozen per class, fetched a few at a time.
  const queue = [];
  for (const c of dataset.classes) {
    const row = h("div", { class: "thumbs" });
    grid.append(h("div", { class: "class-row" }, h("h3", {}, c.name, h("span", { class: "muted", text: `${c.count} images` })), row));
    queue.push(api(`/datasets/${id}/images?label=${encodeURIComponent(c.name)}&limit=12`).then((images) => {
      for (const image of images) {
        const img = h("img", { alt: `${c.name}: ${image.filename}`, title: `${image.filename} (${image.width}×${image.height}${image.split ? `, ${image.split}` : ""})`, class: "thumb" });
        row.append(img);
        thumbnail(img, `/datasets/${id}/images/${image.id}/thumbnail?size=64`);
      }
    }));
  }
  await Promise.all(queue);
}

// A thumbnail into an <img>, retried after a network hiccup; a refused one says why in its tooltip.
async function thumbnail(img, path) {
  for (let attempt = 1; ; attempt++) {
    try {
      img.src = await blobUrl(path);
      return;
    } catch (error) {
      if (error instanceof ApiError || attempt >= 3) {
        img.classList.add("broken");
        img.title = `${img.title}: ${error instanceof ApiError ? describe(error.detail) : "not loaded"}`;
        return;
      }
      await sleep(500 * attempt);
    }
  }
}

// ---------------------------------------------------------------- new job form

let specSchemaCache = null;
async function specSchema() {
  if (!specSchemaCache) {
    const openapi = await (await fetch("/openapi.json")).json();
    specSchemaCache = openapi.components.schemas.JobSpec;
  }
  return specSchemaCache;
}

const MAIN_FIELDS = ["dataset_id", "model", "epochs", "batch_size", "optimizer", "lr", "scheduler", "augmentation", "init"];

function fieldType(prop) {
  const options = prop.anyOf ? prop.anyOf.filter((p) => p.type !== "null") : [prop];
  const base = options[0] || {};
  return { base, nullable: !!prop.anyOf && prop.anyOf.some((p) => p.type === "null") };
}

function buildField(name, prop, context) {
  const { base, nullable } = fieldType(prop);
  const wrap = h("div", { class: "field", dataset: { field: name } });
  const title = h("label", { for: `f-${name}`, text: name });
  let input;
  const def = prop.default;
  if (name === "dataset_id") {
    input = h("select", { id: `f-${name}` }, context.datasets.map((d) =>
      h("option", { value: d.id, text: `${d.id}: ${d.name} (${d.num_images} images)`, selected: String(d.id) === context.dataset })));
  } else if (name === "model") {
    input = h("select", { id: `f-${name}` }, context.models.map((m) =>
      h("option", { value: m.name, text: `${m.name} (${m.default_image_size}px)`, selected: m.name === "simple_cnn" })));
  } else if (base.enum || base.const !== undefined) {
    const values = base.enum || [base.const];
    input = h("select", { id: `f-${name}` },
      nullable ? h("option", { value: "", text: "default", selected: def === null }) : null,
      values.map((v) => h("option", { value: JSON.stringify(v), text: String(v), selected: v === def })));
  } else if (base.type === "boolean") {
    input = h("input", { id: `f-${name}`, type: "checkbox", checked: def === true });
  } else if (base.type === "integer" || base.type === "number") {
    input = h("input", {
      id: `f-${name}`, type: "number", step: base.type === "integer" ? 1 : "any",
      min: base.minimum ?? base.exclusiveMinimum, max: base.maximum ?? base.exclusiveMaximum,
      value: def ?? "", placeholder: def === null || def === undefined ? (nullable ? "default" : "required") : String(def),
    });
  } else if (base.type === "array") {
    input = h("input", { id: `f-${name}`, value: (def || []).join(", "), placeholder: "comma-separated" });
  } else {
    input = h("input", { id: `f-${name}`, value: def ?? "" });
  }
  input.name = name;
  const shown = def === null ? "none" : typeof def === "string" ? def : JSON.stringify(def);
  const defaultText = def === undefined ? "required" : `default: ${shown}`;
  wrap.append(title, input, h("div", { class: "help", text: [prop.description, defaultText].filter(Boolean).join(" — ") }),
    h("div", { class: "field-error" }));
  wrap.readValue = () => {
    if (name === "dataset_id") return Number(input.value);
    if (name === "model") return input.value;
    if (input.type === "checkbox") return input.checked;
    if (input.tagName === "SELECT") return input.value === "" ? null : JSON.parse(input.value);
    if (base.type === "array") return input.value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
    if (input.type === "number") return input.value === "" ? null : Number(input.value);
    return input.value;
  };
  wrap.defaultValue = def;
  return wrap;
}

async function newJobPage(params) {
  const [schema, datasets, models] = await Promise.all([specSchema(), api("/datasets"), api("/models")]);
  if (!datasets.length) {
    page("New job", h("p", {}, "No dataset yet. ", h("a", { href: "#/datasets", text: "Create one first." })));
    return;
  }
  const context = { datasets, models, dataset: params.get("dataset") || String(datasets[datasets.length - 1].id) };
  const names = Object.keys(schema.properties);
  const fields = Object.fromEntries(names.map((n) => [n, buildField(n, schema.properties[n], context)]));
  const mainFields = MAIN_FIELDS.filter((n) => fields[n]).map((n) => fields[n]);
  const moreFields = names.filter((n) => !MAIN_FIELDS.includes(n)).map((n) => fields[n]);
  const status = h("div", { class: "error", id: "job-form-error" });
  const form = h("form", { id: "job-form", onsubmit: async (e) => {
    e.preventDefault();
    status.textContent = "";
    for (const f of Object.values(fields)) { f.classList.remove("invalid"); f.querySelector(".field-error").textContent = ""; }
    // Send what differs from the defaults: the stored spec then reads as what the user chose.
    const spec = {};
    for (const [n, f] of Object.entries(fields)) {
      const v = f.readValue();
      const isDefault = JSON.stringify(v) === JSON.stringify(f.defaultValue ?? null);
      if (schema.required?.includes(n) || !isDefault) spec[n] = v;
    }
    try {
      const job = await postJson("/jobs", spec);
      toast(`job ${job.id} queued`);
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      if (Array.isArray(error.detail)) {
        for (const item of error.detail) {
          const f = fields[item.loc?.[item.loc.length - 1]];
          if (f) { f.classList.add("invalid"); f.querySelector(".field-error").textContent = item.msg; }
        }
      }
      status.textContent = describe(error.detail);
    }
  } },
  h("div", { class: "spec" }, mainFields),
  h("details", { class: "more" }, h("summary", { text: `More options (${moreFields.length})` }),
    h("div", { class: "spec" }, moreFields)),
  h("div", { class: "toolbar" }, h("button", { type: "submit", id: "start-job", text: "Start training" }), status));
  page("New job", h("div", { class: "panel" },
    h("p", { class: "muted", text: "Built from the job-spec schema (/openapi.json). Every option shows its default; only what you change is sent." }),
    form));
}

// ---------------------------------------------------------------- jobs table

async function jobsPage() {
  const table = h("table", { id: "jobs-table" });
  const selected = new Set();
  const compare = h("button", { type: "button", class: "ghost", id: "compare-selected", disabled: true, text: "Compare selected",
    onclick: () => { location.hash = `#/compare?ids=${[...selected].join(",")}`; } });
  page("Jobs", h("div", { class: "panel" },
    h("div", { class: "toolbar" }, h("a", { class: "button", href: "#/jobs/new", text: "New job" }), h("span", { class: "spacer" }), compare),
    table));

  async function refresh() {
    const jobs = await api("/jobs?limit=200");
    table.replaceChildren(
      h("tr", {}, ["", "job", "status", "model", "dataset", "progress", "best", "created", ""].map((t) => h("th", { text: t }))),
      ...jobs.map((job) => {
        const box = h("input", { type: "checkbox", checked: selected.has(job.id), onchange: (e) => {
          if (e.target.checked) selected.add(job.id); else selected.delete(job.id);
          compare.disabled = selected.size < 1;
        } });
        const cancel = ["queued", "running"].includes(job.status)
          ? h("button", { type: "button", class: "ghost", text: "Cancel", onclick: async () => {
            await api(`/jobs/${job.id}/cancel`, { method: "POST" }); refresh();
          } })
          : null;
        return h("tr", { dataset: { job: job.id, status: job.status } },
          h("td", {}, box),
          h("td", {}, h("a", { href: `#/jobs/${job.id}`, text: `#${job.id}` })),
          h("td", {}, badge(job.status)),
          h("td", { text: job.spec.model }),
          h("td", {}, h("a", { href: `#/datasets/${job.dataset_id}`, text: job.dataset_id })),
          h("td", {}, progressBar(job)),
          h("td", { text: job.best ? `${job.best.metric} ${num(job.best.value)} (epoch ${job.best.epoch})` : "–" }),
          h("td", { text: when(job.created_at) }),
          h("td", {}, cancel));
      }));
    if (!jobs.length) table.append(h("tr", {}, h("td", { colspan: 9, class: "muted", text: "No jobs yet." })));
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  cleanups.push(() => clearInterval(timer));
}

// ---------------------------------------------------------------- one job, live

function curves(rows, { idPrefix = "" } = {}) {
  const series = (key, name, dashed) => ({ name, dashed, points: rows.map((r) => [r.epoch, r[key]]) });
  return [
    lineChart({ id: `${idPrefix}loss-chart`, title: "Loss", floor: 0, series: [
      { ...series("train_loss", "train", false), color: PALETTE[0] },
      { ...series("val_loss", "validation", true), color: PALETTE[1] }] }),
    lineChart({ id: `${idPrefix}acc-chart`, title: "Accuracy", yFormat: "percent", floor: 0, ceil: 1, series: [
      { ...series("train_acc", "train", false), color: PALETTE[0] },
      { ...series("val_acc", "validation", true), color: PALETTE[1] }] }),
    lineChart({ id: `${idPrefix}lr-chart`, title: "Learning rate", yFormat: "exp", floor: 0, series: [
      { ...series("lr", "lr", false), color: PALETTE[2] }] }),
  ];
}

function confusionMatrix(evaluation) {
  const m = evaluation.confusion_matrix;
  const max = Math.max(1, ...m.flat());
  return h("table", { class: "confusion", id: "confusion-matrix" },
    h("tr", {}, h("th", { text: "true \\ predicted" }), evaluation.classes.map((c) => h("th", { text: c }))),
    m.map((row, i) => h("tr", {}, h("th", { text: evaluation.classes[i] }), row.map((v, j) => {
      const cell = h("td", { class: i === j ? "diag" : "", text: v, title: `${evaluation.classes[i]} → ${evaluation.classes[j]}: ${v}` });
      const strength = v / max;
      cell.style.background = i === j ? `rgba(22, 163, 74, ${0.1 + 0.8 * strength})` : v ? `rgba(220, 38, 38, ${0.15 + 0.75 * strength})` : "#f8fafc";
      if (strength > 0.6) cell.style.color = "#fff";
      return cell;
    }))));
}

function perClassTable(evaluation) {
  return h("table", { id: "per-class" },
    h("tr", {}, ["class", "precision", "recall", "F1", "support"].map((t, i) => h("th", { class: i ? "num" : "", text: t }))),
    evaluation.per_class.map((c) => h("tr", {}, h("td", { text: c.name }), h("td", { class: "num", text: num(c.precision, 3) }),
      h("td", { class: "num", text: num(c.recall, 3) }), h("td", { class: "num", text: num(c.f1, 3) }), h("td", { class: "num", text: c.support }))));
}

async function jobPage(id) {
  let job = await api(`/jobs/${id}`);
  const rows = [];
  const logs = [];
  let evaluation = null;

  const header = h("div", { class: "toolbar" });
  const progress = h("div", { id: "job-progress" });
  const charts = h("div", { class: "grid2", id: "charts" });
  const summary = h("dl", { class: "kv", id: "job-summary" });
  const evalBox = h("div", { id: "evaluation" }, h("p", { class: "muted", text: "The test evaluation appears when the job has finished." }));
  const epochTable = h("table", { id: "epoch-table" });
  const logBox = h("pre", { class: "logs", id: "job-logs" });
  page(`Job ${id}`,
    h("div", { class: "panel" }, header, progress),
    h("div", { class: "panel" }, charts),
    h("div", { class: "row" },
      h("div", { class: "panel grow" }, h("h2", { text: "Test evaluation" }), evalBox),
      h("div", { class: "panel grow" }, h("h2", { text: "Job" }), summary)),
    h("div", { class: "panel" }, h("h2", { text: "Epochs" }), epochTable),
    h("div", { class: "panel" }, h("h2", { text: "Worker log" }), logBox));

  function drawHeader() {
    const actions = [];
    if (["queued", "running"].includes(job.status)) {
      actions.push(h("button", { type: "button", class: "danger", id: "cancel-job", text: job.progress?.cancel_requested ? "Cancelling…" : "Cancel",
        onclick: async (e) => {
          e.target.disabled = true;
          try { job = await api(`/jobs/${id}/cancel`, { method: "POST" }); toast(`job ${id}: cancel requested`); } catch (error) { toast(describe(error.detail), true); }
        } }));
    }
    if (job.best) {
      actions.push(h("button", { type: "button", class: "ghost", id: "download-checkpoint", text: `Download checkpoint (epoch ${job.best.epoch})`,
        onclick: () => download(`/jobs/${id}/checkpoint`, `job-${id}.safetensors`).catch((e) => toast(describe(e.detail), true)) }));
      actions.push(h("a", { class: "button ghost", href: `#/predict?job=${id}`, text: "Predict with it" }));
    }
    if (rows.length) {
      actions.push(h("button", { type: "button", class: "ghost", text: "Metrics CSV",
        onclick: () => download(`/jobs/${id}/metrics?format=csv`, `job-${id}-metrics.csv`) }));
    }
    header.replaceChildren(badge(job.status), h("strong", { text: `${job.spec.model} on dataset ${job.dataset_id}` }),
      h("span", { class: "muted", text: `${job.spec.epochs} epochs · batch ${job.spec.batch_size} · ${job.spec.optimizer} lr ${job.spec.lr} · ${job.spec.scheduler}` }),
      h("span", { class: "spacer" }), ...actions);
    progress.replaceChildren(progressBar(job, true));
  }

  function drawSummary() {
    const items = [
      ["status", job.status + (job.stop_reason ? ` (${job.stop_reason})` : "")],
      ["best", job.best ? `${job.best.metric} ${num(job.best.value)} at epoch ${job.best.epoch}` : "–"],
      ["classes", (job.classes || []).join(", ") || "–"],
      ["split", job.split_sizes ? Object.entries(job.split_sizes).map(([k, v]) => `${k} ${v}`).join(" · ") : "–"],
      ["device", job.info?.device || "–"],
      ["input", job.info?.image_size ? `${job.info.image_size}px, ${job.info.channels} channel(s)` : "–"],
      ["parameters", job.info?.parameters ? job.info.parameters.toLocaleString() : "–"],
      ["attempts", job.attempts],
      ["created", when(job.created_at)], ["started", when(job.started_at)], ["finished", when(job.finished_at)],
    ];
    if (job.error) items.unshift(["error", job.error]);
    summary.replaceChildren(...items.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { class: k === "error" ? "error" : "", text: v })]));
  }

  function drawCharts() {
    charts.replaceChildren(...curves(rows).map((svg) => h("div", {}, svg)));
    const best = job.best?.epoch;
    epochTable.replaceChildren(
      h("tr", {}, ["epoch", "train loss", "train acc", "val loss", "val acc", "val F1", "lr", "seconds", "img/s"].map((t) => h("th", { class: "num", text: t }))),
      ...rows.map((r) => h("tr", { class: r.epoch === best ? "best" : "" },
        [r.epoch, num(r.train_loss), pct(r.train_acc), num(r.val_loss), pct(r.val_acc), num(r.val_f1, 3), formatValue(r.lr, "exp"), num(r.seconds, 1), Math.round(r.images_per_second)]
          .map((v) => h("td", { class: "num", text: v })))));
  }

  function drawEvaluation() {
    if (!evaluation) return;
    evalBox.replaceChildren(
      h("p", {}, `Best epoch ${evaluation.epoch} on ${evaluation.num_samples} ${evaluation.split} images: accuracy `,
        h("strong", { text: pct(evaluation.accuracy) }), `, macro F1 ${num(evaluation.macro_f1, 3)}`,
        evaluation.top5 !== null ? `, top-5 ${pct(evaluation.top5)}` : ""),
      h("h3", { text: "Confusion matrix" }), confusionMatrix(evaluation),
      h("h3", { text: "Per class" }), perClassTable(evaluation));
  }

  let logTimer = null;
  function renderLogs() {
    clearTimeout(logTimer);
    logTimer = null;
    const stick = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 20;
    logBox.replaceChildren(...logs.slice(-500).map((l) => h("span", { class: l.level, text: `${l.created_at.slice(11, 19)} ${l.level.padEnd(7)} ${l.message}\n` })));
    if (stick) logBox.scrollTop = logBox.scrollHeight;
  }
  function drawLogs() {
    // Batched: a burst of log lines redraws once.
    if (!logTimer) logTimer = setTimeout(renderLogs, 200);
  }

  drawHeader(); drawSummary(); drawCharts();
  const controller = new AbortController();
  cleanups.push(() => controller.abort());
  followEvents(id, (name, data) => {
    if (name === "status") { job = data; drawHeader(); drawSummary(); }
    else if (name === "progress") { job = { ...job, progress: data }; progress.replaceChildren(progressBar(job, true)); }
    else if (name === "epoch") {
      if (!rows.some((r) => r.epoch === data.epoch)) rows.push(data);
      rows.sort((a, b) => a.epoch - b.epoch);
      drawCharts();
      if (rows.length === 1) drawHeader();
    } else if (name === "log") { logs.push(data); drawLogs(); }
    else if (name === "evaluation") { evaluation = data; drawEvaluation(); }
    else if (name === "end") { renderLogs(); main.dataset.ended = "true"; drawHeader(); }  // ended: all shown
  }, controller.signal).catch((error) => fail(error));
}

// ---------------------------------------------------------------- compare

const COMPARE_METRICS = [
  ["val_acc", "validation accuracy", "percent"], ["val_loss", "validation loss", "number"],
  ["train_acc", "train accuracy", "percent"], ["train_loss", "train loss", "number"],
  ["val_f1", "validation macro F1", "number"], ["lr", "learning rate", "exp"],
];

async function comparePage(params) {
  const jobs = await api("/jobs?limit=200");
  const chosen = new Set((params.get("ids") || "").split(",").filter(Boolean).map(Number));
  if (!chosen.size) jobs.slice(0, 3).forEach((j) => chosen.add(j.id));
  let metric = params.get("metric") || "val_acc";
  const chartBox = h("div", { id: "compare-chart" });
  const select = h("select", { id: "compare-metric", onchange: (e) => { metric = e.target.value; draw(); } },
    COMPARE_METRICS.map(([k, label]) => h("option", { value: k, text: label, selected: k === metric })));
  const picker = h("div", { class: "toolbar" }, jobs.map((j) => h("label", { class: "inline" },
    h("input", { type: "checkbox", checked: chosen.has(j.id), onchange: (e) => {
      if (e.target.checked) chosen.add(j.id); else chosen.delete(j.id);
      draw();
    } }), `#${j.id} ${j.spec.model}`)));
  page("Compare jobs", h("div", { class: "panel" }, h("div", { class: "toolbar" }, "Metric ", select), picker, chartBox));
  const cache = new Map();
  async function draw() {
    const ids = [...chosen].sort((a, b) => a - b);
    history.replaceState(null, "", `#/compare?ids=${ids.join(",")}&metric=${metric}`);
    await Promise.all(ids.filter((i) => !cache.has(i)).map(async (i) => cache.set(i, (await api(`/jobs/${i}/metrics`)).epochs)));
    const byId = Object.fromEntries(jobs.map((j) => [j.id, j]));
    const [, label, format] = COMPARE_METRICS.find(([k]) => k === metric);
    const series = ids.map((i, n) => ({
      name: `#${i} ${byId[i]?.spec.model ?? ""} lr ${byId[i]?.spec.lr ?? ""}`, color: PALETTE[n % PALETTE.length],
      points: (cache.get(i) || []).map((r) => [r.epoch, r[metric]]),
    }));
    const bounds = metric === "lr" ? {} : format === "percent" ? { floor: 0, ceil: 1 } : { floor: 0 };
    chartBox.replaceChildren(lineChart({ title: label, series, yFormat: format, logY: metric === "lr", width: 900, height: 380, ...bounds,
      empty: ids.length ? "no epochs yet" : "choose jobs to compare" }));
  }
  await draw();
}

// ---------------------------------------------------------------- predict

async function predictPage(params) {
  const jobs = (await api("/jobs?limit=200")).filter((j) => j.best);
  if (!jobs.length) {
    page("Predict", h("p", { class: "muted", text: "No job has a checkpoint yet: train one first." }));
    return;
  }
  const wanted = params.get("job");
  const select = h("select", { id: "predict-job" }, jobs.map((j) =>
    h("option", { value: j.id, selected: String(j.id) === wanted, text: `#${j.id} ${j.spec.model} on dataset ${j.dataset_id} (${j.best.metric} ${num(j.best.value, 3)}, ${j.status})` })));
  const out = h("div", { id: "prediction" });
  async function predict(files) {
    const file = files[0];
    const body = new FormData();
    body.append("job_id", select.value);
    body.append("file", file);
    out.replaceChildren(h("p", { class: "muted", text: `predicting ${file.name}…` }));
    try {
      const result = await api("/predict", { method: "POST", body });
      const items = Object.entries(result.scores).map(([label, value]) => ({ label, value })).sort((a, b) => b.value - a.value);
      const preview = h("img", { alt: file.name, src: URL.createObjectURL(file) });
      out.replaceChildren(h("div", { class: "pred" },
        h("div", {}, preview, h("div", { class: "muted", text: file.name })),
        h("div", {}, h("div", { class: "label", id: "predicted-label", text: `${result.label} · ${pct(result.score)}` }),
          h("div", { class: "muted", text: `job ${result.job_id}${result.epoch ? `, epoch ${result.epoch}` : ""}` }),
          barChart(items.slice(0, 20), { id: "probabilities", title: "class probabilities" }))));
    } catch (error) {
      out.replaceChildren(h("p", { class: "error", text: describe(error.detail) }));
    }
  }
  page("Predict", h("div", { class: "panel" },
    h("div", { class: "toolbar" }, "Model ", select),
    dropZone({ id: "predict-drop", text: "Drop an image to classify", accept: "image/*", multiple: false, onFiles: predict }),
    out));
}

// ---------------------------------------------------------------- routing

async function route() {
  cleanups.forEach((stop) => stop());
  cleanups = [];
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("header nav a").forEach((a) => a.classList.remove("active"));
  const nav = parts[0] === "jobs" && parts[1] === "new" ? "new" : parts[0];
  document.querySelector(`header nav a[data-nav="${nav}"]`)?.classList.add("active");
  main.dataset.page = nav || "jobs";
  delete main.dataset.ended;
  try {
    if (parts[0] === "datasets" && parts[1]) await datasetPage(Number(parts[1]));
    else if (parts[0] === "datasets") await datasetsPage();
    else if (parts[0] === "jobs" && parts[1] === "new") await newJobPage(params);
    else if (parts[0] === "jobs" && parts[1]) await jobPage(Number(parts[1]));
    else if (parts[0] === "compare") await comparePage(params);
    else if (parts[0] === "predict") await predictPage(params);
    else await jobsPage();
  } catch (error) {
    page("Error");
    fail(error);
  }
}

async function start() {
  setupKeyDialog();
  try {
    const health = await (await fetch("/health")).json();
    document.getElementById("server-state").textContent = `${health.database} · ${health.auth === "api-key" ? "API key required" : "open"}`;
    document.getElementById("key-button").hidden = health.auth !== "api-key";
    if (health.auth === "api-key" && !apiKey()) await askForKey();
  } catch {
    document.getElementById("server-state").textContent = "server unreachable";
  }
  window.addEventListener("hashchange", route);
  await route();
}

start();
