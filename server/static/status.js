// edge-resume status page: polls the JSON API and shows devices and jobs; resumes a job on
// request. Plain JavaScript, no dependencies, no build step.
//
// The token: the page never receives it from the server. It is taken from the address's
// fragment (/#token=...; a fragment is never sent over HTTP) or typed into the form, kept in
// this tab's sessionStorage only, removed from the address at once, and sent only as
// "Authorization: Bearer" on this page's own requests to /v1. Everything the API returns is
// written into the page as text (textContent), never as HTML.
"use strict";

(() => {
  const KEY = "edge-resume.token";
  const POLL_MS = 1500;
  const HIDDEN_POLL_MS = 10000;
  const ACTIVE_PHASES = new Set(["queued", "claiming", "replaying", "rebuilding", "running", "handover-requested"]);

  const $ = (id) => document.getElementById(id);
  let token = null;
  let timer = null;
  let generation = 0; // bumps on sign-out, so that a late answer is dropped
  const localResume = new Map(); // job -> our POST's ResumeModel, or {refused, at}

  class AuthError extends Error {}

  // -- the token -----------------------------------------------------------------------

  function takeTokenFromAddress() {
    const url = new URL(window.location.href);
    const frag = new URLSearchParams(url.hash.replace(/^#/, ""));
    let found = null;
    if (frag.has("token")) {
      found = frag.get("token");
      frag.delete("token");
      const rest = frag.toString();
      url.hash = rest ? "#" + rest : "";
    }
    if (url.searchParams.has("token")) {
      // accepted, but a query string reaches the server and its logs: prefer #token=
      found = found || url.searchParams.get("token");
      url.searchParams.delete("token");
    }
    if (found !== null) {
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
      if (found) sessionStorage.setItem(KEY, found);
    }
  }

  function showLogin(message) {
    $("dash").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setConn("", message ? "Token refused" : "Waiting for the API token");
    $("token").focus();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    token = null;
    generation += 1;
    clearTimeout(timer);
    localResume.clear();
    clearTable("devices");
    clearTable("jobs");
    showLogin(message);
  }

  function signIn(value) {
    token = value;
    $("login").hidden = true;
    $("dash").hidden = false;
    $("forget").hidden = false;
    setConn("", "Connecting…");
    poll();
  }

  // -- the API -------------------------------------------------------------------------

  async function api(path, options) {
    const opts = Object.assign({ cache: "no-store", credentials: "omit" }, options || {});
    opts.headers = Object.assign({ Accept: "application/json", Authorization: "Bearer " + token }, opts.headers || {});
    const r = await fetch(path, opts);
    if (r.status === 401) throw new AuthError("the server refused the token");
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    if (!r.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : r.status + " " + r.statusText;
      const err = new Error(detail);
      err.status = r.status;
      throw err;
    }
    return body;
  }

  async function health() {
    try {
      const r = await fetch("/healthz", { cache: "no-store", credentials: "omit" });
      return r.ok ? await r.json() : null;
    } catch (e) {
      return null;
    }
  }

  async function poll() {
    clearTimeout(timer);
    const gen = generation;
    try {
      const [devices, jobs, h] = await Promise.all([api("/v1/devices"), api("/v1/jobs"), health()]);
      if (gen !== generation) return;
      renderDevices(devices);
      renderJobs(jobs);
      const when = new Date().toLocaleTimeString();
      if (h && h.status !== "ok") {
        const bad = Object.entries(h.roles || {}).filter(([, v]) => v && v.ok === false).map(([k]) => k);
        setConn("degraded", "Live, updated " + when + " · server degraded" + (bad.length ? " (" + bad.join(", ") + ")" : ""));
      } else {
        setConn("live", "Live, updated " + when);
      }
    } catch (e) {
      if (gen !== generation) return;
      if (e instanceof AuthError) {
        signOut("The server refused the token. Enter it again.");
        return;
      }
      setConn("down", "Cannot reach the API (" + e.message + "); retrying");
    }
    timer = setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
  }

  async function resume(job, button) {
    const row = rowOf("jobs", job.job);
    if (job.status === "running" &&
        !window.confirm("Device " + job.device + " looks online and still runs " + job.job +
                        ". Take the job over and run it on the server anyway?")) {
      return;
    }
    button.disabled = true;
    button.textContent = "Resuming…";
    try {
      const r = await api("/v1/jobs/" + encodeURIComponent(job.job) + "/resume", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ reason: "status page" }),
      });
      localResume.set(job.job, r);
      announce("Resume of " + job.job + ": " + r.phase + ".");
    } catch (e) {
      if (e instanceof AuthError) {
        signOut("The server refused the token. Enter it again.");
        return;
      }
      localResume.set(job.job, { refused: e.message, at: Date.now() });
      announce("Resume of " + job.job + " refused: " + e.message);
    }
    if (row && row.isConnected) updateJobRow(row, row._job);
    poll();
  }

  // -- formatting ----------------------------------------------------------------------

  function fmtAge(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    if (s < 1) return "just now";
    if (s < 60) return Math.round(s) + " s ago";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s ago";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h ago";
  }

  function fmtFor(s) {
    return fmtAge(s).replace(/ ago$/, "").replace(/^just now$/, "< 1 s");
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)) + " " + units[i];
  }

  function fmtInt(n) {
    return n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US");
  }

  function fmtRatio(sent, full) {
    if (!full) return null;
    const r = sent / full;
    return (r < 0.01 ? r.toPrecision(1) : r < 10 ? r.toFixed(2) : r.toFixed(1)) + "×";
  }

  // -- rendering -----------------------------------------------------------------------

  function setConn(kind, text) {
    const el = $("conn");
    el.className = "conn" + (kind ? " " + kind : "");
    el.textContent = text;
  }

  function announce(text) {
    $("announce").textContent = text;
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // a cell: <td data-field data-label><div>...</div></td>; one box inside keeps the narrow
  // layout's two columns (label, value) intact
  function cell(field, label) {
    const td = el("td", { "data-field": field, "data-label": label });
    const box = el("div");
    td.appendChild(box);
    td.box = box;
    return td;
  }

  function clearTable(id) {
    $(id).tBodies[0].replaceChildren();
  }

  function rowOf(table, key) {
    for (const tr of $(table).tBodies[0].rows) if (tr.dataset.key === key) return tr;
    return null;
  }

  // rows are kept and updated in place, so focus and screen-reader position survive a poll
  function sync(table, items, keyOf, create, update) {
    const body = $(table).tBodies[0];
    const existing = new Map();
    for (const tr of Array.from(body.rows)) existing.set(tr.dataset.key, tr);
    let before = body.firstChild;
    for (const item of items) {
      const key = keyOf(item);
      let tr = existing.get(key);
      if (tr) existing.delete(key);
      else tr = create(item);
      update(tr, item);
      if (tr !== before) body.insertBefore(tr, before);
      before = tr.nextSibling;
    }
    for (const tr of existing.values()) tr.remove();
  }

  function badge(node, state) {
    const known = ["online", "offline", "running", "resuming", "server-running", "completed", "failed"];
    node.className = "badge " + (known.includes(state) ? state : "unknown");
    setText(node, state);
  }

  function createDeviceRow(d) {
    const tr = el("tr", { "data-key": d.device, "data-device": d.device });
    tr.c = {};
    for (const [f, label] of [["device", "Device"], ["state", "State"], ["last-seen", "Last seen"], ["jobs", "Jobs"]]) {
      tr.c[f] = cell(f, label);
      tr.appendChild(tr.c[f]);
    }
    tr.c.device.box.className = "id";
    tr.c.device.box.textContent = d.device;
    tr.stateBadge = el("span");
    tr.stateFor = el("span", { class: "small" });
    tr.c.state.box.append(tr.stateBadge, tr.stateFor);
    return tr;
  }

  function updateDeviceRow(tr, d) {
    const state = d.online ? "online" : "offline";
    tr.dataset.state = state;
    badge(tr.stateBadge, state);
    const serverNow = d.last_seen + d.last_seen_age_s;
    setText(tr.stateFor, "for " + fmtFor(serverNow - d.online_since));
    setText(tr.c["last-seen"].box, fmtAge(d.last_seen_age_s));
    setText(tr.c.jobs.box, d.jobs.length ? d.jobs.join(", ") : "—");
  }

  function renderDevices(devices) {
    devices.sort((a, b) => a.device.localeCompare(b.device));
    sync("devices", devices, (d) => d.device, createDeviceRow, updateDeviceRow);
    const online = devices.filter((d) => d.online).length;
    setText($("devices-count"), devices.length ? "(" + online + " of " + devices.length + " online)" : "");
    $("devices-empty").hidden = devices.length > 0;
    $("devices").hidden = devices.length === 0;
  }

  const JOB_FIELDS = [
    ["job", "Job"], ["device", "Device"], ["status", "Status"], ["progress", "Progress"],
    ["owner", "Owner · epoch"], ["seq", "Seq"], ["bytes", "Sent / full"],
    ["snapshot", "Last snapshot"], ["resume", "Resume"],
  ];

  function createJobRow(job) {
    const tr = el("tr", { "data-key": job.job, "data-job": job.job });
    tr.c = {};
    for (const [f, label] of JOB_FIELDS) {
      tr.c[f] = cell(f, label);
      tr.appendChild(tr.c[f]);
    }
    tr.jobName = el("span", { class: "id" }, job.job);
    tr.jobKind = el("span", { class: "small" });
    tr.c.job.box.append(tr.jobName, tr.jobKind);
    tr.statusBadge = el("span", { "data-value": "status" });
    tr.statusFor = el("span", { class: "small" });
    tr.c.status.box.append(tr.statusBadge, tr.statusFor);
    tr.bar = el("progress", { max: "1", value: "0", "aria-label": "Progress of " + job.job });
    tr.barText = el("span", { class: "progress-text" });
    tr.devStep = el("span", { class: "small" });
    tr.c.progress.box.append(tr.bar, tr.barText, tr.devStep);
    tr.owner = el("span", { "data-value": "owner" });
    tr.epoch = el("span", { class: "small", "data-value": "epoch" });
    tr.c.owner.box.append(tr.owner, tr.epoch);
    tr.c.seq.className = "num";
    tr.bytes = el("span");
    tr.ratio = el("span", { class: "small" });
    tr.c.bytes.box.append(tr.bytes, tr.ratio);
    tr.button = el("button", { type: "button", "aria-label": "Resume job " + job.job }, "Resume");
    tr.button.addEventListener("click", () => resume(tr._job, tr.button));
    tr.phase = el("span", { class: "phase", "data-value": "phase" });
    tr.c.resume.box.append(tr.button, tr.phase);
    return tr;
  }

  function updateJobRow(tr, job) {
    tr._job = job;
    tr.dataset.status = job.status;
    setText(tr.jobKind, job.kind || "");
    setText(tr.c.device.box, job.device);
    badge(tr.statusBadge, job.status);
    setText(tr.statusFor, "for " + fmtFor(job.status_age_s));

    const p = job.progress;
    tr.bar.className = job.status;
    if (p.total_steps) {
      tr.bar.max = p.total_steps;
      tr.bar.value = Math.min(p.step, p.total_steps);
      const pct = Math.floor((100 * p.step) / p.total_steps);
      setText(tr.barText, fmtInt(p.step) + " / " + fmtInt(p.total_steps) + " (" + pct + " %)");
    } else {
      tr.bar.removeAttribute("value"); // indeterminate
      setText(tr.barText, "step " + fmtInt(p.step));
    }
    const ahead = p.device_step !== null && p.device_step !== undefined && p.device_step > p.step;
    setText(tr.devStep, ahead && job.owner === "edge" ? "device at " + fmtInt(p.device_step) : "");

    setText(tr.owner, job.owner);
    setText(tr.epoch, "epoch " + job.epoch);
    setText(tr.c.seq.box, job.seq === null ? "—" : fmtInt(job.seq));
    setText(tr.bytes, fmtBytes(job.bytes_received) + " / " + fmtBytes(job.full_size));
    const ratio = fmtRatio(job.bytes_received, job.full_size);
    const snaps = job.snapshots + (job.snapshots === 1 ? " snapshot" : " snapshots");
    setText(tr.ratio, (ratio ? ratio + " · " : "") + snaps);
    setText(tr.c.snapshot.box, job.last_snapshot_age_s === null ? "none yet" : fmtAge(job.last_snapshot_age_s));

    // the resume: the server's word (job.resume), unless our own POST is newer than it
    const r = resumeOf(job);
    const error = refusalOf(job);
    const active = r !== null && ACTIVE_PHASES.has(r.phase);
    let phase = "";
    if (error !== null) {
      phase = "refused: " + error;
    } else if (r) {
      phase = "resume: " + r.phase + (r.attempt > 1 ? " (attempt " + r.attempt + ")" : "");
      if (r.error) phase += " (" + r.error + ")";
    }
    setText(tr.phase, phase);
    tr.phase.className = "phase" + (error !== null || (r && r.phase === "failed") ? " error" : "");
    tr.phase.dataset.phase = r ? r.phase : "";
    const canResume = job.status !== "completed" && !active;
    tr.button.disabled = !canResume;
    tr.button.hidden = job.status === "completed";
    // a job its device still runs can be taken over too (after a confirmation), but the
    // button is quiet there: the usual case is a job whose device went offline
    tr.button.className = job.status === "running" ? "quiet" : "";
    setText(tr.button, active ? "Resuming…" : "Resume");
  }

  function resumeOf(job) {
    const local = localResume.get(job.job);
    const server = job.resume || null;
    if (!local || local.refused !== undefined) return server;
    if (server && server.requested_at >= local.requested_at) {
      localResume.delete(job.job); // the server has caught up
      return server;
    }
    return local;
  }

  function refusalOf(job) {
    const local = localResume.get(job.job);
    if (!local || local.refused === undefined) return null;
    const seen = job.resume ? job.resume.requested_at : null;
    if (local.seen === undefined) local.seen = seen;
    if (seen !== local.seen || Date.now() - local.at > 30000) {
      localResume.delete(job.job); // a newer resume, or old news
      return null;
    }
    return local.refused;
  }

  function renderJobs(jobs) {
    jobs.sort((a, b) => a.job.localeCompare(b.job));
    sync("jobs", jobs, (j) => j.job, createJobRow, updateJobRow);
    setText($("jobs-count"), jobs.length ? "(" + jobs.length + ")" : "");
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs").hidden = jobs.length === 0;
  }

  // -- start ---------------------------------------------------------------------------

  function start() {
    takeTokenFromAddress();
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      signIn(value);
    });
    $("forget").addEventListener("click", () => signOut(""));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && token) poll();
    });
    const saved = sessionStorage.getItem(KEY);
    if (saved) signIn(saved);
    else showLogin("");
  }

  start();
})();
