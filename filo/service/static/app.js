/* The page of `python -m filo serve`: score one image, edit a class's defect phrases and the
 * thresholds, see the overlay, the mask and the boxes. Plain JavaScript, no build step; it runs
 * under the page's Content-Security-Policy (script and style from /static/ only, no inline code).
 *
 * Element ids (stable: tests and scripts drive the page through them):
 *   #file                 file input (an image dropped on #drop or pasted lands here too)
 *   #drop, #file_name, #preview   drop zone, chosen file's name, its thumbnail
 *   #class                select of the classes of GET /v1/classes
 *   #phrases              textarea, the class's defect phrases, one per line (sent only when
 *                         they differ from the class's own phrases)
 *   #box_threshold, #text_threshold, #area_threshold, #outside_box_factor, #mask_threshold
 *                         number inputs (each with a slider `#<id>_range`); a value is sent only
 *                         when it differs from the service's default; #reset restores them
 *   #token                bearer token (optional; kept in sessionStorage "filo_token")
 *   #run                  runs now; #auto (checkbox) re-runs 400 ms after a phrase or threshold edit
 *   #status               "loading" (first load), "ready", "running", "done" or "error"
 *   #message              a human sentence about the status
 *   #error                role="alert": the API's `detail` of the last failure ("HTTP 422: ...")
 *   #score                image score (4 decimals); attributes data-request-id (the response's
 *                         id, set once its images are shown), data-score (full precision),
 *                         data-phrases (JSON list of the phrases the result was made with)
 *   #verdict, #position, #mask_info   verdict (or the verdict note), position word, mask info
 *   #overlay, #mask       <img> of the overlay and the binary mask (blob: URLs)
 *   #boxes                tbody, one row per box: #, phrase, score, counted, box
 *   #yaml, #copy_yaml, #copy_note   prompt YAML of the class's phrases, copy button, its note
 *   #raw                  the last response JSON
 */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const THRESHOLDS = ["box_threshold", "text_threshold", "area_threshold", "outside_box_factor",
                      "mask_threshold"];
  const MODEL_THRESHOLDS = THRESHOLDS.slice(0, 4);  // change the forward pass (not the mask one)
  const TOKEN_KEY = "filo_token";
  const DEBOUNCE_MS = 400;

  const state = {
    info: null,           // GET /v1/classes
    file: null,           // the chosen image (File or Blob)
    previewUrl: null,
    imageUrls: [],        // object URLs of the shown overlay and mask
    controller: null,     // AbortController of the running request
    seq: 0,               // number of the latest run; older answers are dropped
    runTimer: null,
    tokenTimer: null,
    autoMask: null,       // the mask threshold the service last derived from the calibration
  };

  // ---- status and errors -----------------------------------------------------------------------
  function setStatus(word, message) {
    $("status").textContent = word;
    $("status").dataset.state = word;
    $("message").textContent = message || "";
  }

  function showError(text) {
    $("error").textContent = text;
  }

  function clearError() {
    $("error").textContent = "";
  }

  class ApiError extends Error {}

  function formatDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {  // FastAPI validation errors
      return detail.map((e) => {
        const loc = Array.isArray(e.loc) ? e.loc.filter((x) => x !== "body").join(".") : "";
        return (loc ? loc + ": " : "") + (e.msg || JSON.stringify(e));
      }).join("; ");
    }
    return detail === undefined ? "" : JSON.stringify(detail);
  }

  async function errorMessage(res) {
    let detail = res.statusText || "request failed";
    try {
      const body = await res.json();
      if (body && body.detail !== undefined) detail = formatDetail(body.detail);
    } catch (_) { /* not JSON: keep the status text */ }
    let text = `HTTP ${res.status}: ${detail}`;
    if (res.status === 401) text += " (enter the service's token in the Token field)";
    return text;
  }

  // ---- API -------------------------------------------------------------------------------------
  function authHeaders() {
    const token = $("token").value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  async function api(path, options = {}) {
    let res;
    try {
      res = await fetch(path, { ...options, headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`cannot reach the service (${err.message}); is it still running?`);
    }
    if (!res.ok) throw new ApiError(await errorMessage(res));
    return res;
  }

  async function fetchObjectUrl(path, signal) {
    const res = await api(path, { signal });
    return URL.createObjectURL(await res.blob());
  }

  function loadImage(img, url) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve();
      img.onerror = () => reject(new ApiError("the browser could not show " + img.id + ".png"));
      img.src = url;
    });
  }

  // ---- classes and defaults --------------------------------------------------------------------
  function currentClass() {
    const info = state.info;
    return info ? info.classes.find((c) => c.name === $("class").value) || null : null;
  }

  function hasPrompts() {
    const m = state.info && state.info.models;
    return !!(m && (m.filo || m.grounding));
  }

  /** The mask threshold the service applies when the request names none. */
  function serviceMaskDefault(changesModel) {
    const c = currentClass();
    const d = state.info.defaults.mask_threshold;
    if (!c || !c.calibrated || c.pixel_threshold === undefined || c.pixel_threshold === null) {
      return d;
    }
    const withheld = changesModel && state.info.models.fusion !== "memory";
    if (withheld) return d;
    // the service derives each image's mask threshold from the class's calibrated image
    // threshold (the verdict's); the field shows the last one it applied
    return state.autoMask !== null && state.autoMask !== undefined ? state.autoMask
                                                                  : c.pixel_threshold;
  }

  function setThreshold(name, value) {
    $(name).value = String(value);
    $(name + "_range").value = String(value);
  }

  function resetThresholds() {
    const d = state.info.defaults;
    for (const name of MODEL_THRESHOLDS) setThreshold(name, d[name]);
    setThreshold("mask_threshold", serviceMaskDefault(false));
  }

  async function loadClasses() {
    setStatus(state.info ? $("status").textContent : "loading", "loading the classes...");
    let info;
    try {
      info = await (await api("/v1/classes")).json();
    } catch (err) {
      showError(err.message);
      setStatus("error", "could not load the classes");
      return;
    }
    const firstLoad = state.info === null;
    state.info = info;
    const select = $("class");
    const previous = select.value;
    select.replaceChildren(...info.classes.map((c) => {
      const opt = document.createElement("option");
      opt.value = c.name;
      opt.textContent = c.name + (c.calibrated ? "  (calibrated)" : "");
      return opt;
    }));
    if (info.classes.some((c) => c.name === previous)) select.value = previous;
    select.disabled = info.classes.length === 0;

    const m = info.models;
    const names = [m.filo && "FiLo", m.grounding && "GroundingDINO",
                   m.memory_bank && `memory bank (fusion: ${m.fusion})`].filter(Boolean);
    $("models").textContent = `Models: ${names.join(", ") || "none"}. ${info.classes.length} ` +
      `classes; ${inputSizes(info)}; uploads up to ` +
      `${info.limits.max_upload_mb} MiB (${info.limits.formats.join(", ")}).`;

    $("phrases").disabled = !hasPrompts();
    $("yaml_section").hidden = !hasPrompts();  // a memory bank alone has no prompts
    for (const name of MODEL_THRESHOLDS) {
      $(name).disabled = $(name + "_range").disabled = !m.grounding;
    }
    if (firstLoad) resetThresholds();
    if (firstLoad || select.value !== previous) classChanged(false);
    else phrasesChanged(false);
    clearError();
    setStatus("ready", state.file ? "" : "choose an image");
    if (state.file) run();
  }

  /** The mask threshold's slider spans the class's map range ([0, 1] but for raw
   *  memory-bank distances). */
  function setMaskRange(c) {
    const [lo, hi] = (c && c.map_range) || [0, 1];
    const step = String((hi - lo) / 100);
    for (const id of ["mask_threshold", "mask_threshold_range"]) {
      $(id).min = String(lo);
      $(id).max = String(hi);
      $(id).step = step;
    }
  }

  function classChanged(rerun) {
    const c = currentClass();
    state.autoMask = null;
    setMaskRange(c);
    $("phrases").value = c && c.phrases ? c.phrases.join("\n") : "";
    if (state.info) setThreshold("mask_threshold", serviceMaskDefault(false));
    phrasesChanged(false);
    if (rerun && state.file) run();
  }

  // ---- phrases and the prompt YAML -------------------------------------------------------------
  function phraseLines(text) {
    return text.split(/\r?\n/).map((s) => s.trim()).filter((s) => s.length > 0);
  }

  function sameList(a, b) {
    return a.length === b.length && a.every((x, i) => x === b[i]);
  }

  /** The phrases to send: null when the textarea holds the class's own phrases (or nothing). */
  function editedPhrases() {
    const c = currentClass();
    if (!c || !c.phrases || !hasPrompts()) return null;
    const lines = phraseLines($("phrases").value);
    if (lines.length === 0 || sameList(lines, c.phrases.map((s) => s.trim()))) return null;
    return lines;
  }

  /** The phrases a run uses: the edited ones, else the class's own (verbatim). */
  function effectivePhrases() {
    const c = currentClass();
    return editedPhrases() || (c && c.phrases) || [];
  }

  function yamlKey(name) {
    return /^[A-Za-z0-9][A-Za-z0-9 -]*$/.test(name) ? name : JSON.stringify(name);
  }

  function promptYaml() {
    const c = currentClass();
    if (!c) return "";
    // JSON strings are valid YAML double-quoted scalars
    const lines = ["# defect phrases edited in the filo serve page (python -m filo serve);",
                   "# use the file with --prompts, or copy the class into your prompt table",
                   "name: edited_in_filo_serve",
                   "classes:",
                   `  ${yamlKey(c.table_key || c.name.replace(/_/g, " "))}:`,
                   ...effectivePhrases().map((p) => `  - ${JSON.stringify(p)}`)];
    const key = c.table_key || c.name.replace(/_/g, " ");
    if (c.object_word && c.object_word !== key) {
      // the word the sentences use for this class (e.g. pcb1 -> pcb)
      lines.push("class_name_map:", `  ${yamlKey(key)}: ${JSON.stringify(c.object_word)}`);
    }
    return lines.join("\n") + "\n";
  }

  function phrasesChanged(rerun) {
    const c = currentClass();
    const edited = editedPhrases();
    const lines = phraseLines($("phrases").value);
    let note = "";
    if (!hasPrompts()) note = "this service scores with a memory bank alone: no phrases to edit";
    else if (edited) note = `${edited.length} edited phrases replace the class's ` +
                            `${c.phrases.length} for this page's requests`;
    else if (lines.length === 0) note = "empty: the class's own phrases are used";
    else note = "the class's own phrases";
    $("phrases_note").textContent = note;

    const yaml = promptYaml();
    $("yaml").value = yaml;
    $("yaml").rows = Math.min(Math.max(yaml.split("\n").length, 4), 18);
    const seen = new Set();
    const dups = effectivePhrases().filter((p) => seen.has(p) || !seen.add(p));
    $("yaml_note").textContent = dups.length
      ? `remove the duplicate phrase ${JSON.stringify(dups[0])}: a prompt file may not repeat one`
      : "";
    $("copy_note").textContent = "";
    if (rerun) scheduleRun();
  }

  async function copyYaml() {
    const text = $("yaml").value;
    try {
      await navigator.clipboard.writeText(text);
      $("copy_note").textContent = "copied";
    } catch (_) {
      $("yaml").focus();
      $("yaml").select();
      const ok = document.execCommand && document.execCommand("copy");
      $("copy_note").textContent = ok ? "copied" : "the text is selected: press Ctrl+C";
    }
  }

  // ---- the image -------------------------------------------------------------------------------
  function setFile(file) {
    if (!file) return;
    state.file = file;
    const kb = (file.size / 1024).toFixed(1);
    $("file_name").textContent = `${file.name || "pasted image"} (${kb} KiB)`;
    if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
    state.previewUrl = URL.createObjectURL(file);
    $("preview").src = state.previewUrl;
    $("preview").hidden = false;
    if (state.info) run();
  }

  function setupDrop() {
    const drop = $("drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (ev) => {
        ev.preventDefault();
        drop.classList.add("dragging");
      });
    }
    for (const type of ["dragleave", "drop"]) {
      drop.addEventListener(type, () => drop.classList.remove("dragging"));
    }
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      const files = ev.dataTransfer && ev.dataTransfer.files;
      if (!files || files.length === 0) return;
      try { $("file").files = files; } catch (_) { /* read-only in old browsers */ }
      setFile(files[0]);
    });
    // a file dropped next to the zone must not replace the page
    window.addEventListener("dragover", (ev) => ev.preventDefault());
    window.addEventListener("drop", (ev) => ev.preventDefault());
    document.addEventListener("paste", (ev) => {
      const items = ev.clipboardData ? [...ev.clipboardData.files] : [];
      const image = items.find((f) => f.type.startsWith("image/"));
      if (image) {
        ev.preventDefault();
        setFile(image);
      }
    });
  }

  // ---- running ---------------------------------------------------------------------------------
  function readNumber(name) {
    const raw = $(name).value.trim();
    if (raw === "") return null;
    const value = Number(raw);
    return Number.isFinite(value) ? value : null;
  }

  function buildForm() {
    const c = currentClass();
    const form = new FormData();
    form.append("image", state.file, state.file.name || "pasted.png");
    form.append("class_name", c.name);
    const phrases = editedPhrases();
    let changesModel = phrases !== null;
    if (phrases) form.append("phrases", phrases.join("\n"));
    if (state.info.models.grounding) {
      for (const name of MODEL_THRESHOLDS) {
        const value = readNumber(name);
        if (value !== null && value !== state.info.defaults[name]) {
          form.append(name, String(value));
          changesModel = true;
        }
      }
    }
    const mask = readNumber("mask_threshold");
    if (mask !== null && mask !== serviceMaskDefault(changesModel)) {
      form.append("mask_threshold", String(mask));
    }
    return form;
  }

  function scheduleRun() {
    clearTimeout(state.runTimer);
    if (!state.file || !state.info || !$("auto").checked) return;
    state.runTimer = setTimeout(run, DEBOUNCE_MS);
  }

  async function run() {
    clearTimeout(state.runTimer);
    if (!state.info) {
      showError("the classes are not loaded yet (a token may be needed)");
      setStatus("error");
      return;
    }
    if (!state.file) {
      showError("choose an image first");
      setStatus("error");
      return;
    }
    const limit = state.info.limits.max_upload_mb * 1024 * 1024;
    if (state.file.size > limit) {
      showError(`the image is larger than the service's ${state.info.limits.max_upload_mb} MiB ` +
                "upload limit");
      setStatus("error");
      return;
    }
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    const seq = ++state.seq;
    setStatus("running", "scoring " + (state.file.name || "the image") + "...");
    const fresh = [];
    try {
      const res = await api("/v1/predict", { method: "POST", body: buildForm(),
                                             signal: controller.signal });
      const result = await res.json();
      fresh.push(await fetchObjectUrl(result.overlay_url, controller.signal));
      fresh.push(await fetchObjectUrl(result.mask_url, controller.signal));
      if (seq !== state.seq) throw new DOMException("superseded", "AbortError");
      await Promise.all([loadImage($("overlay"), fresh[0]), loadImage($("mask"), fresh[1])]);
      for (const url of state.imageUrls) URL.revokeObjectURL(url);
      state.imageUrls = fresh;
      $("overlay").hidden = $("mask").hidden = false;
      render(result);
      clearError();
      const t = result.timing_ms || {};
      setStatus("done", `${result.filename}, ${result.image_size.join(" x ")} px, ` +
                        `${Math.round(t.total || 0)} ms`);
    } catch (err) {
      if (seq !== state.seq || err.name === "AbortError") {
        for (const url of fresh) URL.revokeObjectURL(url);
        return;
      }
      for (const url of fresh) URL.revokeObjectURL(url);
      showError(err.message || String(err));
      setStatus("error", "the last request failed; the result below is the previous one");
    } finally {
      if (state.controller === controller) state.controller = null;
    }
  }

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    row.appendChild(td);
  }

  function render(r) {
    const score = $("score");
    score.textContent = r.image_score.toFixed(4);
    score.dataset.score = String(r.image_score);
    score.dataset.phrases = JSON.stringify((r.settings && r.settings.phrases) || []);
    score.dataset.requestId = r.id;

    const verdict = $("verdict");
    verdict.className = r.verdict ? "verdict-" + r.verdict : "note";
    verdict.textContent = r.verdict
      ? `${r.verdict} (threshold ${Number(r.image_threshold).toFixed(4)})`
      : (r.verdict_note || "no verdict");
    $("position").textContent = r.position || "-";
    if (String(r.mask_threshold_source).startsWith("calibrated")) {
      // verdict, mask and colour scale share one threshold: show it, and the bar's range
      const [lo, hi] = r.color_scale || [0, 1];
      for (const id of ["mask_threshold", "mask_threshold_range"]) {
        $(id).min = String(lo);
        $(id).max = String(Math.max(hi, r.mask_threshold));
        $(id).step = String((hi - lo) / 100);
      }
      state.autoMask = r.mask_threshold;
      setThreshold("mask_threshold", r.mask_threshold);
    }
    $("mask_info").textContent = `${(100 * r.anomalous_fraction).toFixed(1)} % of the image at ` +
      `or above ${Number(r.mask_threshold).toFixed(3)} (${r.mask_threshold_source}); map max ` +
      `${Number(r.map_max).toFixed(3)}`;

    const rows = r.boxes.map((b, i) => {
      const tr = document.createElement("tr");
      if (!b.counted) tr.className = "not-counted";
      cell(tr, String(i + 1), "num");
      cell(tr, b.phrase, "phrase");
      cell(tr, b.score.toFixed(3), "num");
      cell(tr, b.counted ? "yes" : "no");
      cell(tr, b.box.map((v) => v.toFixed(1)).join(", "), "num");
      return tr;
    });
    $("boxes").replaceChildren(...rows);
    const counted = r.boxes.filter((b) => b.counted).length;
    $("boxes_note").textContent = r.boxes.length
      ? `(${r.boxes.length}, ${counted} counted in the score)` : "(none)";
    $("raw").textContent = JSON.stringify(r, null, 1);
  }

  // ---- wiring ----------------------------------------------------------------------------------
  function init() {
    $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
    $("token").addEventListener("input", () => {
      const token = $("token").value.trim();
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
      clearTimeout(state.tokenTimer);
      state.tokenTimer = setTimeout(loadClasses, DEBOUNCE_MS);
    });
    $("file").addEventListener("change", () => setFile($("file").files[0]));
    $("class").addEventListener("change", () => classChanged(true));
    $("phrases").addEventListener("input", () => phrasesChanged(true));
    for (const name of THRESHOLDS) {
      $(name).addEventListener("input", () => {
        const value = readNumber(name);
        if (value !== null) $(name + "_range").value = String(value);
        scheduleRun();
      });
      $(name + "_range").addEventListener("input", () => {
        $(name).value = $(name + "_range").value;
        scheduleRun();
      });
    }
    $("reset").addEventListener("click", () => {
      if (!state.info) return;
      resetThresholds();
      scheduleRun();
    });
    $("run").addEventListener("click", run);
    $("copy_yaml").addEventListener("click", copyYaml);
    setupDrop();
    loadClasses();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

// each model's own input size, in words (GET /v1/classes input_sizes)
function inputSizes(info) {
  const sizes = info.input_sizes || {};
  const parts = [];
  if (sizes.filo) parts.push(`FiLo input ${sizes.filo} px`);
  if (sizes.grounding) parts.push(`GroundingDINO input: short side ${sizes.grounding.short_side} px ` +
                                  `(long side at most ${sizes.grounding.max_side} px)`);
  if (sizes.memory_bank) {
    const sides = [...new Set(Object.values(sizes.memory_bank))];
    parts.push(`memory-bank input ${sides.join(" / ")} px`);
  }
  return parts.length ? parts.join("; ") : `images are scored at ${info.image_size} px`;
}
