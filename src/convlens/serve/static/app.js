// convlens page: choose, drop or paste an image; show the prediction, probability bars and the
// class activation map. Served from the same origin as the API; no external resources.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const drop = $("drop"), input = $("file"), status = $("status"), methodSel = $("method");
  let explainMethods = [];
  let classes = [];
  let busy = 0;
  // A server started with API keys answers 401; the page then asks for a key once and keeps it
  // in this tab's session storage (gone when the tab closes), sending it with every API call.
  const KEY_STORE = "convlens-api-key";

  function api(url, options) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = key ? { Authorization: "Bearer " + key } : {};
    return fetch(url, { ...options, headers }).then((r) => {
      if (r.status === 401) askForKey(key !== null);
      return r;
    });
  }

  function askForKey(rejected) {
    if (rejected) sessionStorage.removeItem(KEY_STORE);
    $("key-note").textContent = rejected ? "that key was not accepted; try another"
      : "kept in this tab only (session storage)";
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("api-key").value = "";
    $("key-form").hidden = true;
    setStatus("", false);
    loadModel();
  });

  function setStatus(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  function percent(p) { return (100 * p).toFixed(p >= 0.9995 || p < 0.0005 ? 1 : 2) + "%"; }

  async function loadModel() {
    try {
      const r = await api("/model");
      const m = await r.json();
      if (!r.ok) throw new Error(m.message || r.statusText);
      const s = m.input_size;
      $("model-info").textContent = `${m.source} · ${m.format}${m.int8 ? " int8" : ""} · ` +
        `${m.num_classes} classes (${m.classes.join(", ")}) · input ${s.height}×${s.width}×${s.channels}`;
      explainMethods = m.explain_methods || [];
      classes = m.classes || [];
      methodSel.replaceChildren();
      for (const name of explainMethods) {
        const o = document.createElement("option");
        o.value = name; o.textContent = name;
        methodSel.appendChild(o);
      }
      if (!explainMethods.length) {
        const o = document.createElement("option");
        o.textContent = "not available"; o.disabled = true;
        methodSel.appendChild(o);
        methodSel.disabled = true;
      }
    } catch (e) {
      $("model-info").textContent = "could not read /model: " + e.message;
    }
  }

  function showBars(probs, label) {
    const bars = $("bars");
    bars.replaceChildren();
    const entries = Object.entries(probs).sort((a, b) => b[1] - a[1]);
    for (const [name, p] of entries) {
      const li = document.createElement("li");
      if (name === label) li.className = "top";
      const n = document.createElement("span"); n.className = "name"; n.textContent = name; n.title = name;
      const t = document.createElement("span"); t.className = "track";
      const f = document.createElement("span"); f.className = "fill"; f.style.width = (100 * p).toFixed(2) + "%";
      t.appendChild(f);
      const v = document.createElement("span"); v.className = "value"; v.textContent = percent(p);
      li.append(n, t, v);
      bars.appendChild(li);
    }
  }

  // The label and its probability; for a photo unlike the training images (known is false),
  // "unknown" with the novelty score that made it so.
  function showVerdict(data) {
    const unknown = data.known === false;
    $("label").textContent = unknown ? "unknown: this photo is unlike the training images" : data.label;
    $("probability").textContent = unknown ? `novelty ${data.novelty.toFixed(3)}` : percent(data.probability);
    $("novelty").textContent = unknown
      ? `Its closest class would be ${classes[data.index] || "?"} (${percent(data.probability)}).`
      : (typeof data.novelty === "number" ? `novelty ${data.novelty.toFixed(3)}` : "");
  }

  async function classify(file) {
    if (!file) return;
    const ticket = ++busy;
    setStatus(`classifying ${file.name || "image"}…`, false);
    const preview = $("preview");
    if (preview.src.startsWith("blob:")) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    const body = new FormData();
    body.append("file", file, file.name || "image");
    const useExplain = explainMethods.length > 0;
    const url = useExplain ? `/explain?method=${encodeURIComponent(methodSel.value)}` : "/predict";
    let data;
    try {
      const r = await api(url, { method: "POST", body });
      data = await r.json().catch(() => ({ message: r.statusText }));
      if (!r.ok) throw new Error(`${r.status}: ${data.message || r.statusText}`);
    } catch (e) {
      if (ticket === busy) { setStatus(e.message, true); $("result").hidden = true; }
      return;
    }
    if (ticket !== busy) return; // a newer image was chosen meanwhile
    showVerdict(data);
    showBars(data.probabilities, data.known === false ? null : data.label);
    $("latency").textContent = `server time ${data.latency_ms.toFixed(1)} ms` +
      (data.timings_ms ? ` (decode ${data.timings_ms.decode.toFixed(1)} ms, model ${data.timings_ms.inference.toFixed(1)} ms)` : "");
    const fig = $("overlay-figure");
    if (data.overlay_png) {
      $("overlay").src = "data:image/png;base64," + data.overlay_png;
      $("overlay-caption").textContent = `${data.method} map for “${data.explained}”`;
      fig.hidden = false;
    } else {
      fig.hidden = true;
    }
    $("result").hidden = false;
    setStatus("", false);
  }

  input.addEventListener("change", () => { classify(input.files[0]); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) classify(f);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.kind === "file");
    if (item) classify(item.getAsFile());
  });
  methodSel.addEventListener("change", () => setStatus("", false));
  loadModel();
})();
