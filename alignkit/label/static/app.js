// alignkit label: the annotator's page. Answers are untrusted: they only ever go into textContent.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  let current = null;
  let busy = false;

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = bad ? "show bad" : "show";
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.className = ""; }, bad ? 5000 : 1400);
  }

  function render(data) {
    const p = data.progress;
    $("done").textContent = p.done;
    $("remaining").textContent = p.remaining;
    const total = p.done + p.remaining;
    $("meter").style.width = (total ? (100 * p.done) / total : 100) + "%";
    current = data.item;
    $("task").hidden = !current;
    $("finished").hidden = !!current;
    if (!current) return;
    $("prompt").textContent = current.prompt;
    $("left").textContent = current.left;
    $("right").textContent = current.right;
    $("reason").value = "";
    document.body.dataset.assignment = current.assignment;
    window.scrollTo(0, 0);
  }

  async function call(method, url, body) {
    const opts = { method: method, credentials: "same-origin", headers: {} };
    if (method === "POST") {
      opts.headers["Content-Type"] = "application/json";
      opts.headers["X-CSRF-Token"] = csrf;
      opts.body = JSON.stringify(body || {});
    }
    const r = await fetch(url, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    if (!r.ok) throw new Error((data && data.error) || ("HTTP " + r.status));
    return data;
  }

  async function act(method, url, body, message) {
    if (busy) return;
    busy = true;
    document.body.classList.add("busy");
    try {
      const data = await call(method, url, body);
      render(data);
      if (message) toast(typeof message === "function" ? message(data) : message);
    } catch (e) {
      toast("Not saved: " + e.message, true);
    } finally {
      busy = false;
      document.body.classList.remove("busy");
    }
  }

  const names = { left: "A is better", right: "B is better", tie: "About the same", skip: "Skipped" };
  function label(which) {
    if (!current) return;
    const btn = $("btn-" + which);
    btn.classList.add("flash");
    setTimeout(() => btn.classList.remove("flash"), 250);
    act("POST", "/api/label", { assignment: current.assignment, label: which, reason: $("reason").value },
        "Saved: " + names[which]);
  }
  function undo() {
    act("POST", "/api/undo", {}, (d) => (d.undone ? "Undone: label it again" : "Nothing to undo"));
  }

  document.querySelectorAll("button.choice").forEach((b) => {
    b.addEventListener("click", () => label(b.dataset.label));
  });
  $("undo").addEventListener("click", undo);
  const keys = { a: "left", "1": "left", arrowleft: "left", b: "right", "2": "right", arrowright: "right",
                 t: "tie", "3": "tie", s: "skip" };
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT") {
      if (e.key === "Escape") e.target.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase();
    if (k === "u") { e.preventDefault(); undo(); return; }
    if (k === "r") { e.preventDefault(); $("reason").focus(); return; }
    if (keys[k]) { e.preventDefault(); label(keys[k]); }
  });
  act("GET", "/api/next");
})();
