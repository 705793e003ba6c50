// imgtriage web page: drop or pick images, POST them to v1/classify, show the answers.
// Plain JavaScript, no build step. Every client-supplied string is shown with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const BAR_LIMIT = 10;
let maxImages = 32;

function headers() {
  const key = $("apikey").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function problemText(resp) {
  try {
    const p = await resp.json();
    return `${p.title || resp.statusText} (${resp.status}): ${p.detail || ""}`;
  } catch (e) {
    return `HTTP ${resp.status} ${resp.statusText}`;
  }
}

async function loadModel() {
  try {
    const ready = await fetch("readyz");
    if (!ready.ok) {
      setStatus("loading model…", "loading");
      setTimeout(loadModel, 1000);
      return;
    }
    const resp = await fetch("v1/model", { headers: headers() });
    if (resp.status === 401) {
      setStatus("API key needed", "down");
      $("settings").open = true;
      return;
    }
    if (!resp.ok) throw new Error(await problemText(resp));
    const m = await resp.json();
    setStatus("ready", "ready");
    $("model").textContent = `${m.model.name} · ${m.classes.length} classes · ` +
      `${m.input.in_chans}ch ${m.input.size.join("×")} · ${m.bundle_sha256.slice(0, 12)} · ${m.backend}`;
    maxImages = (m.limits && m.limits.max_images) || maxImages;
    $("hint").textContent = `${m.limits.allowed_formats.join(", ").toUpperCase()} · up to ` +
      `${maxImages} per request`;
    const sel = $("profile");
    sel.length = 1;
    for (const name of m.profiles || []) sel.add(new Option(name, name));
  } catch (e) {
    setStatus("server unreachable", "down");
    setTimeout(loadModel, 3000);
  }
}

function setStatus(text, cls) {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${cls}`;
}

function card(file) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.querySelector(".name").textContent = file.name;
  node.querySelector(".cls").textContent = "…";
  const img = node.querySelector("img");
  if (/^image\/(jpeg|png|gif|webp|bmp)$/.test(file.type)) {
    img.src = URL.createObjectURL(file);
  } else {
    img.replaceWith(document.createTextNode(file.name.split(".").pop().toUpperCase()));
  }
  $("results").prepend(node);
  return node;
}

function fillBars(list, probs, best) {
  const entries = Object.entries(probs).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of entries.slice(0, BAR_LIMIT)) {
    const li = document.createElement("li");
    if (label === best) li.className = "top";
    const lab = Object.assign(document.createElement("span"), { className: "lab", textContent: label });
    const track = Object.assign(document.createElement("span"), { className: "track" });
    const fill = Object.assign(document.createElement("span"), { className: "fill" });
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    fill.style.display = "block";
    track.append(fill);
    const val = Object.assign(document.createElement("span"), { className: "val", textContent: p.toFixed(3) });
    li.append(lab, track, val);
    list.append(li);
  }
  if (entries.length > BAR_LIMIT) {
    const li = document.createElement("li");
    li.textContent = `+ ${entries.length - BAR_LIMIT} more classes`;
    list.append(li);
  }
}

// Why the model said "unknown" (the result's reason field), in words.
const REASONS = {
  out_of_distribution: "unlike anything the model was trained on",
  low_confidence: "not sure enough to decide",
  ambiguous: "more than one class is plausible",
};

function render(node, entry, classes) {
  const cls = node.querySelector(".cls");
  if (entry.issue) {
    node.classList.add("defect");
    cls.textContent = entry.issue.replace(/_/g, " ");
    node.querySelector(".note").textContent = entry.message;
    return;
  }
  cls.textContent = entry.class;
  node.querySelector(".score").textContent = `score ${entry.score.toFixed(3)}`;
  const best = entry.abstained ? entry.best_class : classes[entry.class_id];
  if (entry.abstained) {
    node.classList.add("abstained");
    node.dataset.reason = entry.reason || "low_confidence";
    node.querySelector(".note").textContent =
      `abstained: ${REASONS[entry.reason] || REASONS.low_confidence} (best guess ${best})`;
  }
  if (entry.set) {
    const set = entry.set.length ? `{${entry.set.join(", ")}}` : "empty (no class is plausible)";
    node.querySelector(".note").textContent += ` · conformal set ${set}`;
  }
  if (entry.probs) fillBars(node.querySelector(".bars"), entry.probs, best);
}

async function classify(files) {
  showError("");
  for (let start = 0; start < files.length; start += maxImages) {
    const chunk = files.slice(start, start + maxImages);
    const nodes = chunk.map(card);
    const form = new FormData();
    for (const f of chunk) form.append("files", f, f.name);
    const q = new URLSearchParams({ include_probs: "true" });
    if ($("tta").checked) q.set("tta", "true");
    if ($("profile").value) q.set("profile", $("profile").value);
    try {
      const resp = await fetch(`v1/classify?${q}`, { method: "POST", body: form, headers: headers() });
      const body = await resp.json().catch(() => ({}));
      const entries = resp.ok ? body.results : body.defects;
      if (!entries) throw new Error(`${body.title || resp.statusText} (${resp.status}): ${body.detail || ""}`);
      const classes = resp.ok ? Object.keys(entries.find((e) => e.probs)?.probs || {}) : [];
      entries.forEach((e, i) => render(nodes[i], e, classes));
      if (!resp.ok) showError(`${body.title} (${resp.status}): ${body.detail}`);
    } catch (e) {
      nodes.forEach((n) => n.remove());
      showError(String(e.message || e));
    }
  }
}

function setup() {
  const drop = $("drop");
  const pick = $("pick");
  drop.addEventListener("click", (ev) => { if (ev.target.tagName !== "LABEL") pick.click(); });
  drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") pick.click(); });
  pick.addEventListener("change", () => { classify([...pick.files]); pick.value = ""; });
  for (const t of ["dragenter", "dragover"]) {
    drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  for (const t of ["dragleave", "drop"]) {
    drop.addEventListener(t, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); classify([...ev.dataTransfer.files]); });
  $("apikey").addEventListener("change", loadModel);
  loadModel();
}

setup();
