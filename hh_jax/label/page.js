// The labeling page: fetch the next pair, show it (text only: never innerHTML, the pairs
// are model output), post the choice, repeat. A reload asks the server again, so it
// resumes at the first unlabeled pair.
"use strict";

let current = null;  // the pair shown
let busy = false;    // one label in flight at a time

function el(id) { return document.getElementById(id); }

function status(text) { el("status").textContent = text; }

function show(data) {
  const p = data.progress;
  el("progress").textContent = `${p.done} of ${p.total} labeled`;
  el("labeler").textContent = data.labeler;
  current = data.pair;
  el("pair").hidden = current === null;
  el("done").hidden = current !== null;
  el("pair").dataset.pairId = current ? current.id : "";
  if (!current) return;
  const conv = el("conversation");
  conv.replaceChildren();
  for (const turn of current.turns) {
    const div = document.createElement("div");
    div.className = "turn " + turn.role;
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = turn.role + ":";
    div.append(role, document.createTextNode(turn.text));
    conv.append(div);
  }
  el("response-a").textContent = current.response_a;
  el("response-b").textContent = current.response_b;
  for (const r of document.querySelectorAll("input[name=strength]")) r.checked = false;
}

async function loadNext() {
  const resp = await fetch("/api/next", {cache: "no-store"});
  if (!resp.ok) throw new Error(`GET /api/next: ${resp.status}`);
  show(await resp.json());
}

async function choose(choice) {
  if (busy || !current) return;
  busy = true;
  const picked = document.querySelector("input[name=strength]:checked");
  const body = {id: current.id, choice: choice,
                strength: picked ? Number(picked.value) : null};
  try {
    const resp = await fetch("/api/label", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body)});
    if (resp.status === 409) status("That pair was already labeled (another tab?): skipped.");
    else if (!resp.ok) throw new Error((await resp.json()).error || `status ${resp.status}`);
    else status("");
    await loadNext();
  } catch (err) {
    status("Not saved: " + err.message);
  } finally {
    busy = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  el("choose-a").addEventListener("click", () => choose("a"));
  el("choose-b").addEventListener("click", () => choose("b"));
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "a" || ev.key === "b") choose(ev.key);
    if (["1", "2", "3"].includes(ev.key)) {
      document.querySelector(`input[name=strength][value="${ev.key}"]`).checked = true;
    }
  });
  loadNext().catch((err) => status("Could not load: " + err.message));
});
