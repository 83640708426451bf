// Perdure's time-travel UI: plain JavaScript, no framework, no build step.
// Every value from the server is put on the page as text (textContent and
// text nodes), never as HTML.
"use strict";

(() => {
  const ROOT = location.pathname.replace(/\/ui(\/.*)?$/, "");
  const state = { invocations: [], actors: [], selected: null, stepRequest: 0 };

  // -- DOM helpers ---------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function clear(node, ...children) {
    node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
    return node;
  }

  const json = (value) => JSON.stringify(value, null, 2);
  const time = (iso) => (iso ? iso.replace("T", " ").replace("Z", "") : "");
  // Today's times without the date (UTC, like the server's).
  const clock = (iso) =>
    iso && iso.slice(0, 10) === new Date().toISOString().slice(0, 10) ? iso.slice(11, 23) : time(iso);
  const badge = (status) => el("span", { class: `badge status-${status}` }, status);
  const short = (id) => (id.length > 13 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id);

  function pre(value, cls) {
    return el("pre", { class: cls || "json" }, json(value === undefined ? null : value));
  }

  function notice(message, isError) {
    const node = document.getElementById("notice");
    node.textContent = message || "";
    node.className = isError ? "error" : "";
  }

  // -- the server -------------------------------------------------------------------------

  async function api(path, options) {
    const response = await fetch(ROOT + path, {
      credentials: "same-origin",
      ...(options || {}),
      headers: { Accept: "application/json", "X-Perdure-UI": "1" },
    });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const error = body && body.error;
      if (response.status === 401) {
        throw new Error("not signed in: open this page as /ui/?token=<token> once");
      }
      throw new Error(error ? `${error.type}: ${error.message}` : `HTTP ${response.status}`);
    }
    return body;
  }

  // -- the lists --------------------------------------------------------------------------

  async function loadLists() {
    const status = document.getElementById("status-filter").value;
    const query = new URLSearchParams({ limit: "1000" });
    if (status) query.set("status", status);
    try {
      const [invocations, actors] = await Promise.all([
        api(`/invocations?${query}`),
        api("/ui/api/actors"),
      ]);
      state.invocations = invocations.invocations.slice().reverse(); // newest first
      state.actors = actors.actors;
      // The API lists the oldest first: past the limit, the newest are not here.
      notice(
        invocations.invocations.length >= 1000
          ? "Showing the oldest 1000 invocations: choose a status, or paste an id, to find others."
          : "",
      );
    } catch (error) {
      notice(error.message, true);
    }
    renderInvocations();
    renderActors();
  }

  function matches(inv, words) {
    const haystack = `${inv.invocation_id} ${inv.target} ${inv.status} ${inv.idempotency_key || ""}`;
    return words.every((w) => haystack.toLowerCase().includes(w));
  }

  function renderInvocations() {
    const words = document.getElementById("search").value.toLowerCase().split(/\s+/).filter(Boolean);
    const shown = state.invocations.filter((inv) => matches(inv, words));
    const rows = shown.map((inv) =>
      el(
        "tr",
        {
          class: inv.invocation_id === state.selected ? "selected" : "",
          "data-id": inv.invocation_id,
          "data-status": inv.status,
          onclick: () => {
            location.hash = `#/invocation/${encodeURIComponent(inv.invocation_id)}`;
          },
        },
        el("td", {}, badge(inv.status)),
        el(
          "td",
          { class: "target" },
          el("a", { href: `#/invocation/${encodeURIComponent(inv.invocation_id)}` }, inv.target),
          inv.actor ? el("span", { class: "actor-of" }, ` ${inv.actor.key} #${inv.actor.seq}`) : null,
        ),
        el("td", { class: "time", title: inv.created_at }, clock(inv.created_at)),
        el("td", { class: "time", title: inv.updated_at }, clock(inv.updated_at)),
        el("td", { class: "id", title: inv.invocation_id }, short(inv.invocation_id)),
      ),
    );
    clear(document.querySelector("#invocations tbody"), rows);
    if (!rows.length) {
      const id = words.length === 1 && words[0].length >= 8 ? document.getElementById("search").value.trim() : null;
      document
        .querySelector("#invocations tbody")
        .append(
          el(
            "tr",
            { class: "empty" },
            el(
              "td",
              { colspan: "5" },
              "No invocation in the list matches.",
              id ? [" ", el("a", { id: "open-id", href: `#/invocation/${encodeURIComponent(id)}` }, `Open ${id}`)] : null,
            ),
          ),
        );
    }
    document.getElementById("invocation-count").textContent =
      shown.length === state.invocations.length
        ? `${shown.length}`
        : `${shown.length} of ${state.invocations.length}`;
  }

  function renderActors() {
    const items = state.actors.map((a) =>
      el(
        "li",
        { "data-type": a.type, "data-key": a.key },
        el(
          "a",
          { href: `#/actor/${encodeURIComponent(a.type)}/${encodeURIComponent(a.key)}` },
          el("span", { class: "actor-type" }, a.type),
          " / ",
          el("span", { class: "actor-key" }, a.key),
        ),
      ),
    );
    clear(document.getElementById("actors"), items.length ? items : el("li", { class: "empty" }, "No durable actor has a message yet."));
    document.getElementById("actor-count").textContent = `${state.actors.length}`;
  }

  // -- an invocation's timeline -----------------------------------------------------------

  function field(label, ...value) {
    return [el("dt", {}, label), el("dd", {}, ...value)];
  }

  function entryView(entry, previous) {
    const ms = previous ? Date.parse(entry.created_at) - Date.parse(previous.created_at) : null;
    const failed = entry.failed_attempts || [];
    const retried = failed.length > 0 || entry.attempts > 1;
    const classes = ["entry", entry.ok ? "ok" : "error", retried ? "retried" : ""];
    const head = el(
      "div",
      { class: "entry-head" },
      el("span", { class: "index" }, `#${entry.index}`),
      el("span", { class: `kind kind-${entry.kind}` }, entry.kind),
      el("span", { class: "name" }, entry.name || ""),
      el("span", { class: "time", title: entry.created_at }, time(entry.created_at)),
      el("span", { class: "delta", title: "since the previous entry" }, ms === null ? "start" : `+${ms} ms`),
      entry.attempts > 1 ? el("span", { class: "attempts" }, `${entry.attempts} attempts`) : null,
      el("span", { class: entry.ok ? "outcome ok" : "outcome error" }, entry.ok ? "ok" : "error"),
    );
    const attempts = failed.length
      ? el(
          "ul",
          { class: "failed-attempts" },
          failed.map((a) =>
            el(
              "li",
              { class: "attempt" },
              el("span", { class: "attempt-no" }, `attempt ${a.attempt} failed`),
              el("span", { class: "time" }, time(a.created_at)),
              el("span", { class: "error-text" }, `${a.error.type}: ${a.error.message}`),
            ),
          ),
        )
      : null;
    const body = entry.ok
      ? entry.value === null || entry.value === undefined
        ? null
        : pre(entry.value)
      : el("div", { class: "error-text" }, `${entry.error.type}: ${entry.error.message}`);
    return el("li", { class: classes.join(" ").trim(), "data-index": entry.index }, head, attempts, body);
  }

  async function showInvocation(id) {
    state.selected = id;
    renderInvocations();
    const detail = clear(document.getElementById("detail"), el("p", { class: "hint" }, "Loading…"));
    let view;
    try {
      view = await api(`/ui/api/invocations/${encodeURIComponent(id)}/timeline`);
    } catch (error) {
      clear(detail, el("p", { class: "error-text" }, error.message));
      return;
    }
    const inv = view.invocation;
    const entries = view.entries;
    const output = entries.length && entries[entries.length - 1].kind === "output" ? entries[entries.length - 1] : null;
    const facts = el(
      "dl",
      { class: "facts" },
      field("id", el("code", {}, inv.invocation_id)),
      field("status", badge(inv.status)),
      field("created", time(inv.created_at)),
      field("updated", time(inv.updated_at)),
      inv.idempotency_key ? field("idempotency key", el("code", {}, inv.idempotency_key)) : [],
      inv.actor
        ? field(
            "actor",
            el(
              "a",
              {
                href: `#/actor/${encodeURIComponent(inv.actor.type)}/${encodeURIComponent(inv.actor.key)}/${inv.actor.seq}`,
              },
              `${inv.actor.type} / ${inv.actor.key}, message ${inv.actor.seq}`,
            ),
          )
        : [],
    );
    const outcome = output
      ? output.ok
        ? el("div", { class: "outcome-box ok" }, el("h3", {}, "Result"), pre(output.value))
        : el(
            "div",
            { class: "outcome-box error" },
            el("h3", {}, "Failed"),
            el("div", { class: "error-text" }, `${output.error.type}: ${output.error.message}`),
          )
      : null;
    const timeline = el(
      "ol",
      { id: "timeline", class: "timeline" },
      entries.map((e, i) => entryView(e, i ? entries[i - 1] : null)),
    );
    const upto = el("input", {
      id: "fork-upto",
      type: "number",
      min: "1",
      max: String(Math.max(1, entries.length)),
      value: String(Math.max(1, output ? entries.length - 1 : entries.length)),
      "aria-label": "journal entries to keep",
    });
    const forkResult = el("div", { id: "fork-result", class: "fork-result" });
    const forkButton = el(
      "button",
      { id: "fork-button", type: "button", onclick: () => runFork(inv.invocation_id, upto, forkResult, forkButton) },
      "Fork (dry run)",
    );
    clear(
      detail,
      el(
        "article",
        { id: "invocation-view", class: "card", "data-id": inv.invocation_id },
        el("h2", {}, inv.target, " ", badge(inv.status)),
        facts,
        outcome,
        el("h3", {}, `Journal: ${entries.length} entries`),
        timeline,
        el(
          "section",
          { class: "fork" },
          el("h3", {}, "Fork"),
          el(
            "p",
            { class: "hint" },
            "Re-run this invocation against the current code from its first entries, in a sandbox. " +
              "The dry run stops before the first step it would run live: nothing external is called.",
          ),
          el("div", { class: "fork-controls" }, el("label", { for: "fork-upto" }, "keep entries before #"), upto, forkButton),
          forkResult,
        ),
      ),
    );
  }

  async function runFork(id, upto, target, button) {
    button.disabled = true;
    clear(target, el("p", { class: "hint" }, "Forking…"));
    try {
      const query = new URLSearchParams({ upto: upto.value });
      const result = await api(`/ui/api/invocations/${encodeURIComponent(id)}/fork?${query}`, { method: "POST" });
      const parts = [
        el("p", {}, "Fork: ", badge(result.status), ` ${result.replayed} step(s) replayed, ${result.executed} executed`),
      ];
      if (result.stopped_at) {
        parts.push(
          el(
            "p",
            { class: "stopped" },
            `Stopped before step "${result.stopped_at.step}" (journal index ${result.stopped_at.index}): it would run live.`,
          ),
        );
      }
      if (result.error) parts.push(el("div", { class: "error-text" }, `${result.error.type}: ${result.error.message}`));
      if (result.status === "completed") parts.push(el("h4", {}, "Value"), pre(result.value));
      clear(target, el("div", { class: `fork-box status-${result.status}`, "data-status": result.status }, parts));
    } catch (error) {
      clear(target, el("p", { class: "error-text" }, error.message));
    } finally {
      button.disabled = false;
    }
  }

  // -- an actor's history -------------------------------------------------------------------

  function leaves(value, path, out) {
    if (value !== null && typeof value === "object" && Object.keys(value).length) {
      for (const [k, v] of Object.entries(value)) {
        leaves(v, Array.isArray(value) ? `${path}[${k}]` : path ? `${path}.${k}` : k, out);
      }
    } else {
      out.push([path || ".", value]);
    }
    return out;
  }

  function changeFor(path, changes) {
    return changes.find(
      (c) => c.path === path || path.startsWith(`${c.path}.`) || path.startsWith(`${c.path}[`) || c.path === ".",
    );
  }

  function stateTable(view) {
    const rows = leaves(view.state, "", []).map(([path, value]) => {
      const change = changeFor(path, view.changes);
      const shown =
        change && change.change === "changed" && change.path === path
          ? [el("del", {}, JSON.stringify(change.before)), " → ", el("ins", {}, JSON.stringify(value))]
          : [JSON.stringify(value)];
      return el(
        "tr",
        { class: change ? change.change : "", "data-path": path },
        el("th", { scope: "row" }, path),
        el("td", {}, el("code", {}, shown)),
      );
    });
    for (const c of view.changes.filter((c) => c.change === "removed")) {
      rows.push(
        el(
          "tr",
          { class: "removed", "data-path": c.path },
          el("th", { scope: "row" }, c.path),
          el("td", {}, el("code", {}, el("del", {}, JSON.stringify(c.before)))),
        ),
      );
    }
    return el("table", { id: "state-table", class: "state" }, el("tbody", {}, rows));
  }

  function changeList(view) {
    if (view.at === 0) return el("p", { class: "hint" }, "The initial state, before any message.");
    if (!view.changes.length) return el("p", { id: "changes", class: "hint" }, "This message changed nothing.");
    return el(
      "ul",
      { id: "changes", class: "changes" },
      view.changes.map((c) =>
        el(
          "li",
          { class: c.change, "data-path": c.path, "data-change": c.change },
          el("span", { class: "change-kind" }, c.change),
          el("code", { class: "path" }, c.path),
          c.change === "added"
            ? el("code", {}, el("ins", {}, JSON.stringify(c.after)))
            : c.change === "removed"
              ? el("code", {}, el("del", {}, JSON.stringify(c.before)))
              : el("code", {}, el("del", {}, JSON.stringify(c.before)), " → ", el("ins", {}, JSON.stringify(c.after))),
        ),
      ),
    );
  }

  function messageCard(view) {
    const m = view.message;
    if (!m) return el("div", { id: "message", class: "card sub" }, el("h3", {}, "No message"), el("p", { class: "hint" }, "The state before the first message."));
    const out = m.output;
    return el(
      "div",
      { id: "message", class: "card sub" },
      el("h3", {}, `Message ${view.at}: `, el("code", {}, m.target), " ", badge(m.status)),
      el(
        "dl",
        { class: "facts" },
        field("invocation", el("a", { href: `#/invocation/${encodeURIComponent(m.invocation_id)}` }, short(m.invocation_id))),
        field("handled", time(m.updated_at)),
      ),
      el("h4", {}, "Input"),
      pre(m.input),
      out
        ? out.ok
          ? [el("h4", {}, "Reply"), pre(out.value)]
          : [el("h4", {}, "Error"), el("div", { class: "error-text" }, `${out.error.type}: ${out.error.message}`)]
        : null,
    );
  }

  async function showActor(type, key, at) {
    state.selected = null;
    renderInvocations();
    const detail = document.getElementById("detail");
    clear(detail, el("p", { class: "hint" }, "Loading…"));
    let first;
    try {
      first = await api(actorStepPath(type, key, at));
    } catch (error) {
      clear(detail, el("p", { class: "error-text" }, error.message));
      return;
    }
    const slider = el("input", {
      id: "actor-slider",
      type: "range",
      min: "0",
      max: String(first.last),
      value: String(first.at),
      step: "1",
      "aria-label": "message",
    });
    const label = el("output", { id: "slider-label", for: "actor-slider" });
    const body = el("div", { id: "actor-body" });
    const view = el(
      "article",
      { id: "actor-view", class: "card", "data-type": type, "data-key": key },
      el("h2", {}, el("span", { class: "actor-type" }, type), " / ", el("span", { class: "actor-key" }, key)),
      el(
        "div",
        { class: "slider-row" },
        el("button", { type: "button", id: "step-back", title: "previous message", onclick: () => nudge(-1) }, "◀"),
        slider,
        el("button", { type: "button", id: "step-forward", title: "next message", onclick: () => nudge(1) }, "▶"),
        label,
      ),
      body,
    );
    clear(detail, view);
    const setLabel = (k) => {
      label.textContent = k === 0 ? `before message 1 of ${first.last}` : `after message ${k} of ${first.last}`;
    };
    const render = (step) => {
      view.setAttribute("data-at", String(step.at));
      clear(
        body,
        el(
          "div",
          { class: "columns" },
          messageCard(step),
          el(
            "div",
            { class: "card sub" },
            el("h3", {}, step.at === 0 ? "Initial state" : `State after message ${step.at}`),
            stateTable(step),
            el("details", {}, el("summary", {}, "as JSON"), el("pre", { id: "state-json", class: "json" }, json(step.state))),
          ),
        ),
        el("div", { class: "card sub" }, el("h3", {}, step.at === 0 ? "Changes" : `Changes made by message ${step.at}`), changeList(step)),
      );
    };
    let timer = null;
    const go = (k) => {
      setLabel(k);
      history.replaceState(null, "", `#/actor/${encodeURIComponent(type)}/${encodeURIComponent(key)}/${k}`);
      const ticket = ++state.stepRequest;
      clearTimeout(timer);
      timer = setTimeout(async () => {
        try {
          const step = await api(actorStepPath(type, key, k));
          if (ticket === state.stepRequest) render(step);
        } catch (error) {
          if (ticket === state.stepRequest) clear(body, el("p", { class: "error-text" }, error.message));
        }
      }, 40);
    };
    const nudge = (d) => {
      const k = Math.min(first.last, Math.max(0, Number(slider.value) + d));
      slider.value = String(k);
      go(k);
    };
    slider.addEventListener("input", () => go(Number(slider.value)));
    setLabel(first.at);
    render(first);
  }

  function actorStepPath(type, key, at) {
    const query = at === null || at === undefined ? "" : `?at=${encodeURIComponent(at)}`;
    return `/ui/api/actors/${encodeURIComponent(type)}/${encodeURIComponent(key)}/step${query}`;
  }

  // -- routing ----------------------------------------------------------------------------

  function route() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    if (parts[0] === "invocation" && parts[1]) {
      showInvocation(parts[1]);
    } else if (parts[0] === "actor" && parts[1] && parts[2]) {
      const at = parts[3] !== undefined && /^\d+$/.test(parts[3]) ? Number(parts[3]) : null;
      showActor(parts[1], parts[2], at);
    } else {
      state.selected = null;
      renderInvocations();
      clear(
        document.getElementById("detail"),
        el("p", { class: "hint" }, "Choose an invocation to see its timeline, or an actor to travel through its states."),
      );
    }
  }

  document.addEventListener("DOMContentLoaded", async () => {
    document.getElementById("search").addEventListener("input", renderInvocations);
    document.getElementById("status-filter").addEventListener("change", loadLists);
    document.getElementById("refresh").addEventListener("click", loadLists);
    window.addEventListener("hashchange", route);
    await loadLists();
    document.body.setAttribute("data-ready", "1");
    route();
  });
})();
