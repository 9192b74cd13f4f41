/* cryid ward dashboard: MQTT over websockets (vendor/mqtt.min.js), no build step, no framework.
 *
 * Topics, per followed room prefix P (default cryid/<room>):
 *   P/status (online|offline, retained)   P/status/source (ok|flat|down, retained, when published)
 *   P/stats (daemon health)               P/babies (retained roster)
 *   P/baby/<id>/state (retained)          P/baby/<id>, P/unknown (cry events)
 *   P/pending (retained: the unnamed episodes still waiting for a nurse)
 *   P/cmd/confirm, P/cmd/reject (nurse commands, published here)   P/cmd/result (their answers)
 * and, for a room of a daemon serving several rooms (config.json's rooms[].daemon_status, e.g. cryid/status),
 * the daemon's own status (online|offline, retained, its last will): the room is OFFLINE when either says so.
 * Payload fields that an older daemon does not send (confidence, candidates, candidates[].confirmed, reason) are
 * optional here.
 */
"use strict";

(function () {
  const LOG_MAX = 200;
  const UNCERTAIN_MAX = 8;
  const COMMAND_TIMEOUT_MS = 15000;
  const QUICK_DROP_MS = 15000;   // a connection closed by the broker sooner than this after it was accepted
  const QUICK_DROPS = 3;         // ... this many times within a minute: another client has this user
  const $ = (id) => document.getElementById(id);

  const S = {
    cfg: null,
    client: null,
    user: null,
    rooms: new Map(),        // prefix -> room
    events: [],              // newest first
    seen: new Set(),         // event ids (at-least-once delivery: de-duplicate)
    pending: new Map(),      // request_id -> {el, timer}
    results: new Map(),      // request_id -> result shown
    sound: false,
    audio: null,
    lastBeep: 0,
  };

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }
  const pad = (n) => String(n).padStart(2, "0");
  function clock(t) {
    if (!t) return "";
    const d = t instanceof Date ? t : new Date(t);
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function ago(t) {
    if (!t) return "";
    const s = Math.max(0, (Date.now() - new Date(t).getTime()) / 1000);
    if (s < 60) return "just now";
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    const h = Math.floor(s / 3600);
    return `${h} h ${Math.floor((s % 3600) / 60)} min ago`;
  }
  function duration(fromIso) {
    const s = Math.max(0, (Date.now() - new Date(fromIso).getTime()) / 1000);
    return s < 60 ? `${Math.floor(s)} s` : `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  }
  const pct = (p) => `${Math.round(p * 100)}%`;
  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }
  function parse(payload) {
    const text = new TextDecoder().decode(payload);
    if (text === "") return null;
    try { return JSON.parse(text); } catch (e) { return text; }
  }
  function brokerUrl(u) {
    if (/^wss?:\/\//.test(u)) return u;
    return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${u}`;
  }
  function babyName(room, id) {
    const r = room && room.roster.get(id);
    return r && r.display_name ? r.display_name : null;
  }
  function babyLabel(room, id) {
    const n = babyName(room, id);
    return n ? `${n} (${id})` : id;
  }
  const isNurse = () => !!S.user && (S.cfg.nurse_users || []).includes(S.user);

  // ------------------------------------------------------------------ rooms and tiles
  function makeRoom(name, prefix, daemonStatus) {
    const node = $("room-template").content.firstElementChild.cloneNode(true);
    node.dataset.room = name;
    node.querySelector(".room-name").textContent = `Room ${name}`;
    $("rooms").append(node);
    return {
      name, prefix, node,
      daemonTopic: daemonStatus || null, daemon: null,  // several rooms: the daemon's own status topic
      status: null, source: null, stats: null, statsAt: 0, lastEventAt: null,
      roster: new Map(), states: new Map(), tiles: new Map(), uncertain: [],
      listed: new Set(),  // episode ids of the daemon's last retained pending list
    };
  }

  function tileFor(room, id) {
    let t = room.tiles.get(id);
    if (!t) {
      t = $("tile-template").content.firstElementChild.cloneNode(true);
      t.dataset.baby = id;
      room.tiles.set(id, t);
    }
    return t;
  }

  function renderTiles(room) {
    const ids = new Set([...room.roster.keys(), ...room.states.keys()]);
    const box = room.node.querySelector(".tiles");
    for (const [id, t] of room.tiles) if (!ids.has(id)) { t.remove(); room.tiles.delete(id); }
    const sorted = [...ids].sort();
    sorted.forEach((id, i) => {
      const t = tileFor(room, id);
      if (box.children[i] !== t) box.insertBefore(t, box.children[i] || null);
      updateTile(room, id, t);
    });
    room.node.querySelector(".no-babies").hidden = ids.size > 0;
  }

  function updateTile(room, id, t) {
    const st = room.states.get(id) || {};
    const name = babyName(room, id);
    set(t.querySelector(".t-name"), name || `Baby ${id}`);
    set(t.querySelector(".t-id"), name ? `id ${id}` : "no display name");
    let state = "quiet";
    let label = "Quiet";
    let forText = "";
    if (st.crying) {
      const since = st.crying_since ? new Date(st.crying_since).getTime() : Date.now();
      const mins = (Date.now() - since) / 60000;
      state = mins >= S.cfg.alert_after_min ? "alert" : "crying";
      label = state === "alert" ? "LONG CRYING" : "CRYING";
      forText = st.crying_since ? `for ${duration(st.crying_since)}` : "";
    }
    if (t.dataset.state !== state) t.dataset.state = state;
    set(t.querySelector(".t-label"), label);
    set(t.querySelector(".t-for"), forText);
    set(t.querySelector(".t-last"), st.last_cry_at
      ? `Last cry ${clock(st.last_cry_at)} (${ago(st.last_cry_at)})` : "No cry heard yet");
    set(t.querySelector(".t-totals"), st.episodes_24h === undefined ? ""
      : `24 h: ${st.episodes_24h} episode${st.episodes_24h === 1 ? "" : "s"}, ` +
        `${Number(st.cry_minutes_24h).toFixed(1)} min crying`);
  }
  function set(node, text) { if (node.textContent !== text) node.textContent = text; }

  function renderRoomFacts(room) {
    const f = (c) => room.node.querySelector(c);
    // a several-room daemon's will is its own status: dead, it leaves its rooms' statuses "online"
    const offline = room.status === "offline" || room.daemon === "offline";
    const online = room.status === "online" && !offline;
    set(f(".f-daemon"), offline ? "OFFLINE" : room.status === null ? "no news yet" : online ? "ONLINE" : "OFFLINE");
    const off = f(".b-offline");
    off.hidden = !offline;
    set(off, `Room ${room.name}: the cryid daemon is OFFLINE. Cries are not being identified.`);
    const st = room.stats;
    const level = st && st.input_level_dbfs !== null && st.input_level_dbfs !== undefined
      ? st.input_level_dbfs : null;
    let mic = "no news yet";
    let warn = "";
    if (room.source === "down" || (st && st.source_ok === false)) {
      mic = "DOWN";
      warn = `Room ${room.name}: the microphone is DOWN${st && st.source_error ? ` (${st.source_error})` : ""}.`;
    } else if (room.source === "flat" || (level !== null && level < S.cfg.silent_below_dbfs)) {
      mic = `SILENT${level !== null ? ` (${level.toFixed(0)} dBFS)` : ""}`;
      warn = `Room ${room.name}: the microphone is SILENT. Check that it is plugged in and not muted.`;
    } else if (st || room.source === "ok") {
      mic = `OK${level !== null ? ` (${level.toFixed(0)} dBFS)` : ""}`;
    }
    set(f(".f-mic"), mic);
    const mb = f(".b-mic");
    mb.hidden = !warn || !online;
    set(mb, warn);
    let last = room.lastEventAt;  // else the latest cry in the retained state (the log starts empty)
    for (const s of room.states.values()) if (s.last_cry_at && (!last || s.last_cry_at > last)) last = s.last_cry_at;
    set(f(".f-last"), last ? `${clock(last)} (${ago(last)})` : "none yet");
  }

  // ------------------------------------------------------------------ events, log, uncertain
  function candidatesText(room, ev) {
    const c = Array.isArray(ev.candidates) ? ev.candidates.slice(0, 3) : [];
    if (c.length) {
      return "probably " + c.map((x) => x.probability === null || x.probability === undefined
        ? babyLabel(room, x.baby_id) : `${babyLabel(room, x.baby_id)} ${pct(x.probability)}`).join(" or ");
    }
    if (ev.best_baby_id) {
      return `closest ${babyLabel(room, ev.best_baby_id)}` +
        (ev.runner_up ? `, then ${babyLabel(room, ev.runner_up.baby_id)}` : "");
    }
    return "no baby enrolled";
  }
  // The uncertain list, where a nurse decides: each candidate as its own element, marked when the daemon had
  // no confirmed cry of it (candidates[].confirmed false; an older daemon sends no flag: no mark).
  function candidatesLine(room, ev) {
    const c = Array.isArray(ev.candidates) ? ev.candidates.slice(0, 3) : [];
    if (!c.length) return el("span", { class: "candidates", text: candidatesText(room, ev) });
    const line = el("span", { class: "candidates" }, "probably ");
    c.forEach((x, i) => {
      if (i) line.append(" or ");
      const p = x.probability === null || x.probability === undefined ? "" : ` ${pct(x.probability)}`;
      const flag = typeof x.confirmed === "boolean" ? String(x.confirmed) : null;
      line.append(el("span", { class: "candidate", "data-baby": x.baby_id, "data-confirmed": flag },
        `${babyLabel(room, x.baby_id)}${p}`,
        x.confirmed === false ? el("span", { class: "unconfirmed", text: "no confirmed cry yet" }) : null));
    });
    return line;
  }
  // Why the daemon named no baby (the event's reason); null for a named event or a reason this page does
  // not know (an older or newer daemon).
  const REASONS = new Map([
    ["not_confirmed", (best) =>
      `Not named because ${best} has no confirmed cry yet: confirming this cry teaches the system ${best}.`],
    ["below_min_confidence", () => "Not named: the system is not sure enough."],
    ["below_min_score", () => "Not named: not similar enough to any enrolled baby."],
    ["below_min_margin", () => "Not named: too close between two babies."],
    ["no_candidates", () => "Not named: no baby is enrolled in this room."],
  ]);
  function reasonLine(room, ev) {
    if (ev.baby_id || !REASONS.has(ev.reason)) return null;
    const best = ev.best_baby_id ? babyLabel(room, ev.best_baby_id) : "the likeliest baby";
    return el("span", { class: "reason", "data-reason": ev.reason, text: REASONS.get(ev.reason)(best) });
  }
  function certainty(ev) {
    const parts = [];
    if (typeof ev.confidence === "number") parts.push(`confidence ${pct(ev.confidence)}`);
    if (typeof ev.score === "number") parts.push(`score ${ev.score.toFixed(2)}`);
    if (typeof ev.margin === "number") parts.push(`margin ${ev.margin.toFixed(2)}`);
    return parts.join(", ");
  }
  function isUncertain(ev) {
    return ev.kind === "episode" && (ev.decision === "unknown" ||
      (typeof ev.confidence === "number" && ev.confidence < S.cfg.uncertain_below));
  }

  function onEvent(room, ev) {
    if (!ev || typeof ev !== "object" || !ev.event_id || S.seen.has(ev.event_id)) return;
    S.seen.add(ev.event_id);
    ev._room = room;
    room.lastEventAt = ev.ended_at || new Date().toISOString();
    S.events.unshift(ev);
    if (S.events.length > LOG_MAX) S.seen.delete(S.events.pop().event_id);
    if (isUncertain(ev)) {
      room.uncertain.unshift(ev);
      room.uncertain.length = Math.min(room.uncertain.length, UNCERTAIN_MAX);
      renderUncertain(room);
    }
    renderRoomFacts(room);
    renderLog();
  }

  // Retained P/pending: the unnamed episodes waiting for a nurse, newest first. A page opened later has not
  // seen them; one the daemon listed before and lists no more was answered (confirmed or rejected, from any
  // screen or `cryid enroll`) or aged out: it leaves the box; one listed again (an answer undone) comes back.
  function onPending(room, data) {
    const eps = ((data && Array.isArray(data.episodes)) ? data.episodes : [])
      .filter((ev) => ev && typeof ev === "object" && ev.event_id && ev.episode_id);
    const now = new Set(eps.map((ev) => ev.episode_id));
    const gone = (ev) => room.listed.has(ev.episode_id) && !now.has(ev.episode_id);
    let changed = room.uncertain.some(gone);
    room.uncertain = room.uncertain.filter((ev) => !gone(ev));
    room.listed = now;
    for (const ev of eps.slice().reverse()) {
      if (!S.seen.has(ev.event_id)) { onEvent(room, ev); continue; }
      if (room.uncertain.some((u) => u.episode_id === ev.episode_id)) continue;
      ev._room = room;  // seen before and taken off: back in its place by end time
      const end = (e) => Date.parse(e.ended_at) || 0;
      const at = room.uncertain.findIndex((u) => end(u) < end(ev));
      room.uncertain.splice(at < 0 ? room.uncertain.length : at, 0, ev);
      room.uncertain.length = Math.min(room.uncertain.length, UNCERTAIN_MAX);
      changed = true;
    }
    if (changed) renderUncertain(room);
  }

  function logRow(ev) {
    const room = ev._room;
    const who = ev.baby_id ? babyLabel(room, ev.baby_id) : `Unknown (${candidatesText(room, ev)})`;
    const what = ev.kind === "episode"
      ? `Episode ${Number(ev.duration_s || 0).toFixed(0)} s, ${ev.n_expirations} cries`
      : "Cry (provisional)";
    return el("tr", { "data-kind": ev.kind, "data-baby": ev.baby_id || "unknown", "data-event": ev.event_id },
      el("td", { text: clock(ev.started_at) }),
      el("td", { class: "col-room", text: room.name }),
      el("td", { text: what }),
      el("td", { text: who }),
      el("td", { text: certainty(ev) }),
      el("td", { class: "col-actions" }, ev.kind === "episode" ? actions(room, ev) : null));
  }

  function renderLog() {
    const filter = $("log-filter").value;
    const body = $("log-body");
    const rows = S.events.filter((ev) => !filter || (filter === "unknown" ? !ev.baby_id : ev.baby_id === filter));
    body.replaceChildren(...rows.map(logRow));
    $("log-empty").hidden = rows.length > 0;
    $("log-table").hidden = rows.length === 0;
  }

  function renderFilter() {
    const sel = $("log-filter");
    const keep = sel.value;
    const ids = new Map();
    for (const room of S.rooms.values()) for (const id of room.roster.keys()) ids.set(id, babyLabel(room, id));
    for (const ev of S.events) if (ev.baby_id && !ids.has(ev.baby_id)) ids.set(ev.baby_id, ev.baby_id);
    const opts = [el("option", { value: "", text: "all babies" }), el("option", { value: "unknown", text: "unknown cries" })];
    for (const [id, label] of [...ids].sort()) opts.push(el("option", { value: id, text: label }));
    sel.replaceChildren(...opts);
    sel.value = [...sel.options].some((o) => o.value === keep) ? keep : "";
  }

  function renderUncertain(room) {
    const box = room.node.querySelector(".uncertain");
    box.hidden = room.uncertain.length === 0;
    const list = room.node.querySelector(".uncertain-list");
    list.replaceChildren(...room.uncertain.map((ev) => {
      const head = ev.decision === "unknown" ? "Unknown cry" : `Uncertain: ${babyLabel(room, ev.baby_id)}?`;
      return el("li", { "data-event": ev.event_id, "data-reason": ev.baby_id ? null : ev.reason },
        el("strong", { text: `${clock(ev.started_at)} ${head}` }),
        candidatesLine(room, ev),
        el("span", { class: "muted", text: certainty(ev) }),
        reasonLine(room, ev),
        actions(room, ev));
    }));
    room.node.querySelector(".uncertain-hint").hidden = !list.querySelector(".unconfirmed");
  }

  // ------------------------------------------------------------------ nurse actions
  function actions(room, ev) {
    if (!isNurse()) return null;
    const box = el("div", { class: "actions", "data-episode": ev.episode_id });
    const shown = S.results.get(ev.episode_id);
    const result = el("span", { class: "result", role: "status" });
    if (shown) { result.textContent = shown.text; if (shown.ok !== null) result.dataset.ok = String(shown.ok); }
    const best = ev.baby_id || ev.best_baby_id;
    if (best) {
      box.append(el("button", { type: "button", class: "btn", "data-action": "confirm",
        onclick: () => command(room, "confirm", ev, best, result) }, `Confirm ${babyLabel(room, best)}`));
    }
    const others = [...room.roster.keys()].filter((id) => id !== best);
    if (others.length) {
      const sel = el("select", { "aria-label": "reassign to" },
        ...others.map((id) => el("option", { value: id, text: babyLabel(room, id) })));
      box.append(sel, el("button", { type: "button", class: "btn", "data-action": "reassign",
        onclick: () => command(room, "confirm", ev, sel.value, result) }, "Reassign"));
    }
    if (ev.baby_id) {
      box.append(el("button", { type: "button", class: "btn", "data-action": "reject",
        onclick: () => command(room, "reject", ev, ev.baby_id, result) }, `Not ${babyLabel(room, ev.baby_id)}`));
    }
    box.append(result);
    return box;
  }

  function command(room, verb, ev, babyId, resultEl) {
    const req = { request_id: uuid(), episode_id: ev.episode_id, baby_id: babyId, by: S.user };
    const show = (text, ok) => {
      S.results.set(ev.episode_id, { text, ok });
      document.querySelectorAll(`.actions[data-episode="${ev.episode_id}"] .result`).forEach((r) => {
        r.textContent = text;
        if (ok === null) delete r.dataset.ok; else r.dataset.ok = String(ok);
      });
    };
    if (!S.client || !S.client.connected) { show("Not sent: no connection to the broker", false); return; }
    show(`Sending ${verb}…`, null);
    const timer = setTimeout(() => {
      if (S.pending.delete(req.request_id)) show("No answer from the daemon (is it running?)", false);
    }, COMMAND_TIMEOUT_MS);
    S.pending.set(req.request_id, { show, verb, babyId, room, timer });
    S.client.publish(`${room.prefix}/cmd/${verb}`, JSON.stringify(req), { qos: 1 }, (err) => {
      if (err) { clearTimeout(timer); S.pending.delete(req.request_id); show(`Not sent: ${err.message}`, false); }
    });
  }

  function onResult(res) {
    if (!res || typeof res !== "object") return;
    const p = S.pending.get(res.request_id);
    if (!p) return;
    clearTimeout(p.timer);
    S.pending.delete(res.request_id);
    if (res.ok) {
      const what = p.verb === "confirm" ? `Confirmed ${babyLabel(p.room, p.babyId)}` : `Marked not ${babyLabel(p.room, p.babyId)}`;
      p.show(what + (res.confirmation_id !== undefined && res.confirmation_id !== null ? ` (#${res.confirmation_id})` : ""), true);
    } else {
      p.show(`Refused: ${res.error || "no reason given"}`, false);
    }
  }

  // ------------------------------------------------------------------ MQTT
  function onMessage(topic, payload) {
    for (const room of S.rooms.values()) {
      if (room.daemonTopic === topic) { room.daemon = parse(payload); renderRoomFacts(room); }
    }
    for (const room of S.rooms.values()) {
      if (!topic.startsWith(room.prefix + "/")) continue;
      const sub = topic.slice(room.prefix.length + 1);
      const data = parse(payload);
      if (sub === "status") { room.status = data; renderRoomFacts(room); }
      else if (sub === "status/source") { room.source = data; renderRoomFacts(room); }
      else if (sub === "stats") { room.stats = data; room.statsAt = Date.now(); renderRoomFacts(room); }
      else if (sub === "babies") {
        room.roster = new Map(((data && data.babies) || []).map((b) => [b.baby_id, b]));
        renderTiles(room); renderFilter(); renderUncertain(room);
      } else if (sub === "unknown") onEvent(room, data);
      else if (sub === "pending") onPending(room, data);
      else if (sub === "cmd/result") onResult(data);
      else {
        const m = /^baby\/([^/]+)(\/state)?$/.exec(sub);
        if (!m) return;
        if (m[2]) {
          if (data && typeof data === "object") room.states.set(m[1], data); else room.states.delete(m[1]);
          renderTiles(room);
        } else onEvent(room, data);
      }
      return;
    }
  }

  function setConn(state, text) {
    const c = $("conn");
    c.dataset.conn = state;
    $("conn-text").textContent = text;
    const b = $("banner-broker");
    b.hidden = state === "connected" || state === "connecting";
    b.textContent = state === "signin" || state === "refused" || state === "taken"
      ? "Not signed in to the ward broker: nothing on this page is live. Sign in."
      : "No connection to the ward broker: what you see may be out of date. Reconnecting by itself…";
  }

  function connect(user, password) {
    if (S.client) { S.client.end(true); S.client = null; }
    S.user = user || null;
    renderWho();
    const url = brokerUrl(S.cfg.broker_url);
    const opts = {
      clientId: `cryid-dash-${(user || "anon").replace(/[^A-Za-z0-9_-]/g, "")}-${uuid().slice(0, 8)}`,
      // MQTT 5 (the broker says why it disconnects us), 3.1.1 for brokers without it (the demo's amqtt)
      protocolVersion: S.cfg.mqtt_protocol === "3.1.1" ? 4 : 5, clean: true, keepalive: 20, reconnectPeriod: 2000, connectTimeout: 8000,
      resubscribe: true,
    };
    if (user) { opts.username = user; opts.password = password || ""; }
    setConn("connecting", "Connecting…");
    const client = mqtt.connect(url, opts);
    S.client = client;
    const mine = () => S.client === client;  // events of a client replaced by a new sign-in are ignored
    let connectedAt = 0;         // when the broker last accepted this connection (0: not connected)
    const quickDrops = [];       // times the broker closed it soon after accepting it
    const giveWay = () => {
      client.end(true);
      S.client = null;
      setConn("taken", "Signed out: user in use elsewhere");
      openSignin(`Another screen or tool is most likely signed in to the broker as ${user || "this user"}: ` +
        "the broker keeps one connection per user and closed this page's connection each time. Sign in with a " +
        "user of its own (deploy/mosquitto/PASSWORDS.md).");
    };
    client.on("connect", () => {
      if (!mine()) return;
      connectedAt = Date.now();
      setConn("connected", `Live${user ? "" : " (anonymous)"}`);
      const daemons = [...S.rooms.values()].filter((r) => r.daemonTopic).map((r) => r.daemonTopic);
      client.subscribe([...new Set([...S.rooms.values()].map((r) => `${r.prefix}/#`).concat(daemons))], { qos: 1 });
    });
    client.on("reconnect", () => { if (mine()) setConn("reconnecting", "Reconnecting…"); });
    client.on("offline", () => { if (mine()) setConn("reconnecting", "Offline, reconnecting…"); });
    client.on("close", () => {
      if (!mine()) return;
      if (connectedAt) {
        // The shipped broker makes the client id the user name: a second page or tool signed in as the
        // same user replaces this connection, this page's reconnect replaces that one, and so on for
        // ever. Closed soon after being accepted, QUICK_DROPS times in a minute: give way. (A broker
        // restart closes a connection that had lasted, and the reconnects fail until it is back.)
        const now = Date.now();
        if (now - connectedAt < QUICK_DROP_MS) quickDrops.push(now); else quickDrops.length = 0;
        while (quickDrops.length && now - quickDrops[0] > 60000) quickDrops.shift();
        connectedAt = 0;
        if (quickDrops.length >= QUICK_DROPS) { giveWay(); return; }
      }
      if ($("conn").dataset.conn === "connected") setConn("reconnecting", "Reconnecting…");
    });
    client.on("error", (err) => {
      if (!mine()) return;
      const code = err && err.code;
      if (code === 4 || code === 5 || code === 134 || code === 135) {  // bad user/password, not authorised
        client.end(true);
        S.client = null;
        sessionStorage.removeItem("cryid.user");
        sessionStorage.removeItem("cryid.pass");
        setConn("refused", "Sign-in refused");
        openSignin(`The broker refused ${user ? `user ${user}` : "an anonymous connection"}: ${err.message}`);
      }
    });
    client.on("disconnect", (packet) => {
      // MQTT 5 brokers that give the reason (142: session taken over) need no counting
      if (mine() && packet && packet.reasonCode === 142) giveWay();
    });
    client.on("message", (topic, payload) => { if (mine()) onMessage(topic, payload); });
  }

  // ------------------------------------------------------------------ sign-in
  function renderWho() {
    const who = S.user ? `Signed in as ${S.user}${isNurse() ? " (nurse: may confirm)" : " (read only)"}` : "Not signed in";
    $("who").textContent = who;
    $("signout").hidden = !sessionStorage.getItem("cryid.user");
    document.body.dataset.nurse = String(isNurse());
    for (const room of S.rooms.values()) renderUncertain(room);
    renderLog();
  }
  function openSignin(error) {
    const e = $("signin-error");
    e.hidden = !error;
    e.textContent = error || "";
    $("signin-user").value = sessionStorage.getItem("cryid.user") || S.user || S.cfg.username || "";
    $("signin-pass").value = "";
    if (!$("signin").open) $("signin").showModal();
  }
  function wireSignin() {
    $("signin-open").addEventListener("click", () => openSignin(""));
    $("signin-cancel").addEventListener("click", () => $("signin").close());
    $("signin-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const user = $("signin-user").value.trim();
      const pass = $("signin-pass").value;
      sessionStorage.setItem("cryid.user", user);
      sessionStorage.setItem("cryid.pass", pass);
      $("signin").close();
      connect(user, pass);
    });
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem("cryid.user");
      sessionStorage.removeItem("cryid.pass");
      start();
    });
  }

  // ------------------------------------------------------------------ sound
  function wireSound() {
    $("sound").addEventListener("click", () => {
      S.sound = !S.sound;
      if (S.sound && !S.audio && window.AudioContext) S.audio = new AudioContext();
      $("sound").setAttribute("aria-pressed", String(S.sound));
      $("sound").textContent = `Sound alerts: ${S.sound ? "on" : "off"}`;
    });
  }
  function beep() {
    if (!S.sound || !S.audio || Date.now() - S.lastBeep < 10000) return;
    S.lastBeep = Date.now();
    const o = S.audio.createOscillator();
    const g = S.audio.createGain();
    o.frequency.value = 880;
    g.gain.value = 0.2;
    o.connect(g).connect(S.audio.destination);
    o.start();
    o.stop(S.audio.currentTime + 0.6);
  }

  // ------------------------------------------------------------------ start
  function start() {
    const user = sessionStorage.getItem("cryid.user");
    if (user) connect(user, sessionStorage.getItem("cryid.pass") || "");
    else if (S.cfg.password !== undefined && S.cfg.password !== null) connect(S.cfg.username, S.cfg.password);
    else if (S.cfg.username) {
      if (S.client) { S.client.end(true); S.client = null; }
      S.user = null;
      renderWho();
      setConn("signin", "Sign-in needed");
      openSignin("");
    }
    else connect(null, null);
  }

  async function main() {
    wireSignin();
    wireSound();
    $("log-filter").addEventListener("change", renderLog);
    try {
      const r = await fetch("config.json", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      S.cfg = await r.json();
    } catch (e) {
      setConn("refused", "No configuration");
      $("banner-broker").hidden = false;
      $("banner-broker").textContent = `The page could not load config.json (${e.message}); ask the ward's IT.`;
      return;
    }
    for (const r of S.cfg.rooms) S.rooms.set(r.prefix, makeRoom(r.room, r.prefix, r.daemon_status));
    renderLog();
    start();
    setInterval(() => {
      let alert = false;
      for (const room of S.rooms.values()) {
        for (const [id, t] of room.tiles) { updateTile(room, id, t); alert = alert || t.dataset.state === "alert"; }
        renderRoomFacts(room);
      }
      if (alert) beep();
    }, 1000);
  }

  document.addEventListener("DOMContentLoaded", main);
})();
