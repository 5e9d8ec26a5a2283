// The vidsynth page: a form that posts to /v1/videos, a live view of the job from its event stream, and a history.
"use strict";

const FIELDS = ["prompt", "negative_prompt", "preset", "seed", "frames", "width", "height", "steps", "guidance",
                "scheduler", "num_videos", "init_video", "strength"];
const NUMBERS = new Set(["seed", "frames", "width", "height", "steps", "guidance", "num_videos", "strength"]);
const $ = (id) => document.getElementById(id);
let current = null; // the job shown in the job panel
let shown = 0; // which of its videos
let stream = null; // its EventSource

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "Content-Type": "application/json" }, ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error?.message || `HTTP ${response.status}`);
    error.status = response.status;
    error.fields = body.error?.fields || [];
    throw error;
  }
  return body;
}

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((node) => (node.textContent = ""));
  document.querySelectorAll(".invalid").forEach((node) => node.classList.remove("invalid"));
}

function showError(error) {
  let placed = false;
  for (const { field, message } of error.fields || []) {
    const slot = document.querySelector(`[data-error-for="${field.split(".")[0]}"]`);
    if (slot) {
      slot.textContent = message;
      $(field.split(".")[0])?.classList.add("invalid");
      if (field !== "prompt" && field !== "negative_prompt") $("advanced").open = true;
      placed = true;
    }
  }
  if (!placed) $("form-error").textContent = error.message;
}

function readForm() {
  const request = {};
  for (const name of FIELDS) {
    const value = $(name).value.trim();
    if (value === "" && name !== "prompt") continue;
    if (name === "strength" && !request.init_video) continue; // strength belongs to a start video
    request[name] = NUMBERS.has(name) ? Number(value) : value;
  }
  return request;
}

function fillForm(request) {
  for (const name of FIELDS) {
    const value = request[name];
    $(name).value = Array.isArray(value) ? value[0] : (value ?? "");
  }
  startFrom(request.init_video);
  $("advanced").open = true;
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// Each field's meaning (as a tooltip) and its range, from the request schema the server validates with: the page
// keeps no copy of the rules. A 63-bit seed's bound is beyond a JavaScript number's exact range and is left out.
function describeFields(schema) {
  const exact = (bound) => bound !== undefined && Math.abs(bound) <= Number.MAX_SAFE_INTEGER;
  for (const name of FIELDS) {
    const property = schema.properties[name];
    const rule = property.anyOf?.find((option) => option.type !== "null") ?? property;
    $(name).title = property.description ?? "";
    const lowest = rule.minimum ?? rule.exclusiveMinimum;
    if (exact(lowest)) $(name).min = lowest;
    if (exact(rule.maximum)) $(name).max = rule.maximum;
  }
}

// Video-to-video: the next job starts from an upload or a finished job's video (by id), or from noise when `id` is
// empty. `label` says what it is.
function startFrom(id, label) {
  $("init_video").value = id || "";
  $("start-video").textContent = label || id || "";
  $("start-from").hidden = !id;
  if (!id) {
    $("strength").value = "";
    $("start-file").value = "";
  }
}

async function upload() {
  const file = $("start-file").files[0];
  if (!file) return;
  clearErrors();
  try {
    const sent = await api("/v1/uploads", { method: "POST", body: file, headers: { "Content-Type": file.type } });
    startFrom(sent.id, `${file.name} (${sent.width}x${sent.height})`);
  } catch (error) {
    if (error.status === 401) return askForToken();
    startFrom("");
    showError(error.fields?.length ? error : { fields: [{ field: "body", message: error.message }] });
  }
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  $("submit").disabled = true;
  try {
    const job = await api("/v1/videos", { method: "POST", body: JSON.stringify(readForm()),
                                          headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() } });
    show(job);
    refreshHistory();
  } catch (error) {
    if (error.status === 401) return askForToken();
    showError(error);
  } finally {
    $("submit").disabled = false;
  }
}

function askForToken() {
  const token = prompt("This server needs its access token:");
  if (token) location.href = "/?token=" + encodeURIComponent(token);
}

function describe(job) {
  if (job.status === "queued") return `queued (${job.queue_position} ahead)`;
  if (job.status === "failed") return `failed: ${job.error?.message || "unknown error"}`;
  return job.status.replace("_", " ");
}

function show(job) {
  current = job;
  history.replaceState(null, "", `#${job.id}`); // the address of this job's view, to come back to or pass on
  if (stream) stream.close();
  $("job").hidden = false;
  shown = 0;
  $("job-prompt").textContent = caption(job, 0);
  $("job-status").textContent = describe(job);
  $("progress").value = job.progress;
  $("phase").textContent = "";
  showWarnings(job.warnings);
  $("player").hidden = true;
  $("player").removeAttribute("src");
  $("outputs").hidden = true;
  $("download").hidden = true;
  $("download-gif").hidden = true;
  $("reuse").hidden = false;
  $("start-from-this").hidden = true;
  $("cancel").hidden = !["queued", "in_progress"].includes(job.status);
  if (job.status === "completed") return play(job);
  if (["queued", "in_progress"].includes(job.status)) follow(job.id);
}

// What the generation warned of: words the model never saw, the low-memory mode.
function showWarnings(warnings) {
  const items = warnings.map((text) => Object.assign(document.createElement("li"), { textContent: text }));
  $("job-warnings").replaceChildren(...items);
  $("job-warnings").hidden = items.length === 0;
}

// "about 40 s left": the time since the job started, scaled by the share of it still to do (events carry the
// server's clock, so a page opened mid-job estimates as well as one that watched from the start).
function timeLeft(started, data) {
  if (started === null || data.progress <= 0 || data.step < 2) return "";
  const seconds = Math.round((data.time - started) * (100 - data.progress) / data.progress);
  if (seconds < 60) return `, about ${seconds} s left`;
  const minutes = Math.round(seconds / 60);
  return minutes < 60 ? `, about ${minutes} min left` : `, about ${Math.floor(minutes / 60)} h ${minutes % 60} min left`;
}

function follow(id) {
  stream = new EventSource(`/v1/videos/${id}/events`);
  const on = (name, handler) => stream.addEventListener(name, (message) => current?.id === id && handler(JSON.parse(message.data)));
  let started = null;
  on("queued", (data) => { $("job-status").textContent = `queued (${data.queue_position} ahead)`; });
  on("warning", (data) => {
    if (current.warnings.includes(data.message)) return; // a reopened stream replays what the job already lists
    current.warnings.push(data.message);
    showWarnings(current.warnings);
  });
  on("started", (data) => {
    started = data.time ?? null;
    $("job-status").textContent = "in progress";
    $("phase").textContent = "encoding the prompt";
  });
  on("step", (data) => {
    $("job-status").textContent = "in progress";
    $("progress").value = data.progress;
    const which = data.videos > 1 ? ` (video ${data.video + 1}/${data.videos})` : "";
    $("phase").textContent = `denoising step ${data.step}/${data.total}${which}${timeLeft(started, data)}`;
  });
  const phase = (text) => (data) => {
    $("progress").value = data.progress;
    $("phase").textContent = `${text} ${data.step}/${data.total}`;
  };
  on("start_video", phase("encoding the start video"));
  on("decoding", phase("decoding frames"));
  on("encoding", () => { $("phase").textContent = "writing the video"; });
  for (const end of ["completed", "failed", "canceled", "deleted"]) {
    on(end, async () => {
      stream.close();
      if (end === "deleted") return;
      show(await api(`/v1/videos/${id}`));
      refreshHistory();
    });
  }
}

const content = (id, variant, index = 0) => `/v1/videos/${id}/content?variant=${variant}&index=${index}`;

// Video `index` of a job: prompt after prompt, `num_videos` of each, the seed counting up from the request's.
function caption(job, index) {
  const prompts = [].concat(job.request.prompt);
  return `${prompts[Math.floor(index / (job.request.num_videos || 1))]} (seed ${job.request.seed + index})`;
}

// A finished job's video `index`, with a button for each of its videos when it made several.
function play(job, index = 0) {
  shown = index;
  const url = content(job.id, "video", index);
  $("job-prompt").textContent = caption(job, index);
  $("progress").value = 100;
  $("player").src = url;
  $("player").hidden = false;
  $("player").play().catch(() => {}); // autoplay may be refused; the controls are there
  $("download").href = url;
  $("download").hidden = false;
  $("download-gif").href = content(job.id, "gif", index);
  $("download-gif").hidden = false;
  $("start-from-this").hidden = false;
  $("cancel").hidden = true;
  const buttons = Array.from({ length: job.outputs }, (_, other) => {
    const button = Object.assign(document.createElement("button"), { type: "button", className: "secondary",
                                                                     textContent: `${other + 1}` });
    button.title = caption(job, other);
    button.setAttribute("aria-pressed", String(other === index));
    button.addEventListener("click", () => play(job, other));
    return button;
  });
  $("outputs").replaceChildren(...buttons);
  $("outputs").hidden = job.outputs < 2;
}

async function cancel() {
  if (!current) return;
  try {
    show(await api(`/v1/videos/${current.id}/cancel`, { method: "POST" }));
  } catch (error) {
    $("phase").textContent = error.message;
  }
}

async function refreshHistory() {
  let page;
  try {
    page = await api("/v1/videos?limit=50");
  } catch (error) {
    if (error.status === 401) return askForToken();
    throw error;
  }
  const list = $("history");
  list.replaceChildren();
  $("history-empty").hidden = page.data.length > 0;
  for (const job of page.data) {
    const item = document.createElement("li");
    item.dataset.id = job.id;
    const thumbnail = document.createElement("img");
    thumbnail.alt = "";
    if (job.status === "completed") thumbnail.src = content(job.id, "thumbnail");
    thumbnail.addEventListener("click", () => show(job));
    const text = document.createElement("div");
    text.className = "text";
    const title = document.createElement("div");
    title.textContent = [].concat(job.request.prompt)[0];
    const details = document.createElement("div");
    details.className = "muted";
    const count = job.outputs > 1 ? ` · ${job.outputs} videos` : "";
    details.textContent = `seed ${job.request.seed}${count} · ${describe(job)}`;
    text.append(title, details);
    text.addEventListener("click", () => show(job));
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.className = "secondary reuse";
    reuse.textContent = "Use these settings";
    reuse.addEventListener("click", () => fillForm(job.request));
    item.append(thumbnail, text, reuse);
    list.append(item);
  }
}

// A server started with --compile compiles before its first job: say so until it is ready.
async function watchWarmUp() {
  const health = await api("/healthz").catch(() => ({ ready: true }));
  $("warming-up").hidden = health.ready !== false;
  if (health.ready === false) setTimeout(watchWarmUp, 3000);
}

async function start() {
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("reuse").addEventListener("click", () => current && fillForm(current.request));
  $("start-from-this").addEventListener("click", () => {
    const reference = shown ? `${current.id}/${shown}` : current.id; // the API's name for a job's other videos
    startFrom(reference, `${caption(current, shown)} (${reference})`);
    window.scrollTo({ top: 0, behavior: "smooth" });
    $("prompt").focus();
  });
  $("clear-start").addEventListener("click", () => startFrom(""));
  $("start-file").addEventListener("change", upload);
  try {
    const settings = await api("/v1/settings");
    $("model").textContent = `model: ${settings.model}`;
    $("scheduler").add(new Option("preset's", ""));
    for (const name of settings.schedulers) $("scheduler").add(new Option(name, name));
    for (const name of settings.presets) $("preset").add(new Option(name, name));
    for (const [name, value] of Object.entries(settings.defaults)) if ($(name)) $(name).placeholder = value;
    describeFields(settings.schema);
    // What the chosen preset sets for this model, as the server resolves it, shown where the settings are left empty.
    const showPreset = () => {
      const chosen = settings.preset_settings[$("preset").value];
      $("steps").placeholder = chosen.steps;
      $("scheduler").options[0].text = `preset's (${chosen.scheduler})`;
    };
    $("preset").addEventListener("change", showPreset);
    showPreset();
    if (settings.vocabulary) {
      $("vocabulary").textContent = `${settings.model} knows only the ${settings.vocabulary.length} words of its ` +
        `training captions: ${settings.vocabulary.join(", ")}.`;
      $("vocabulary").hidden = false;
    }
  } catch (error) {
    if (error.status === 401) return askForToken();
    $("form-error").textContent = error.message;
  }
  refreshHistory();
  watchWarmUp();
  const linked = location.hash.slice(1); // a job's address: show that job
  if (/^video_[0-9a-f]{24}$/.test(linked)) api(`/v1/videos/${linked}`).then(show, () => history.replaceState(null, "", "/"));
}

start();
