// netd's dashboard: reads the admin API and /api/events/stream, writes the page
// with DOM calls only.  Everything a client sent netd (a subject, a header, a
// path, a body) goes into the page as text (textContent, append(string)),
// never as markup; a mail's HTML part goes into a sandboxed frame the server
// serves under its own policy.
"use strict";

(() => {
  const main = document.getElementById("main");
  const MAX_EVENTS = 500;
  const PAGE_SIZE = 50;
  const RATE_POINTS = 60;
  // A rule for each kind to start from (issue #16's examples).
  const RULE_EXAMPLES = {
    smtp: '{"match": {"stage": "rcpt", "rcpt": "*@flaky.test"}, "reply": "451 4.3.0 try later", "times": 2}',
    http: '{"match": {"method": "POST", "path": "/v1/users"}, "reply": {"status": 503}, "times": 1}',
    dns: '{"match": {"name": "*.down.test"}, "rcode": "SERVFAIL"}',
    ftp: '{"match": {"command": "RETR"}, "reply": "550 4.0.0 not today"}',
    other: '{"reset": true, "nth": 3}',
  };
  // Fields of a session that are seconds since the epoch.
  const TIME_KEYS = new Set(["since", "time", "started", "connected"]);
  const state = {
    csrf: "",
    tokenRequired: false,
    services: {},
    rates: {},
    lastTotals: {},
    rulesServices: [],
    events: [],
    lastId: 0,
    source: null,
    listeners: new Set(),
    cleanup: null,
    onServices: null,
    mailQuery: { from: "", to: "", subject: "", text: "", offset: 0 },
    // The namespace every page and the live stream are scoped to ("": all),
    // kept in the URL's hash (#/mail/mail?namespace=t42) so a link keeps it.
    namespace: null,
    namespacesSeen: new Set(),
    started: false,
    firstServices: null,
    // A mail list asked for with the session, when the page opens on one: {path, answer}.
    firstList: null,
  };

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  // DOM helpers: text in, never markup.

  function safeHref(value) {
    const text = String(value);
    if (text.startsWith("#") || (text.startsWith("/") && !text.startsWith("//"))) return text;
    try {
      const url = new URL(text);
      if (url.protocol === "http:" || url.protocol === "https:") return url.href;
    } catch (_) {
      // not a URL: no link
    }
    return "#";
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "href") node.setAttribute("href", safeHref(value));
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // rows: <tr>s, or the <tbody> a page fills itself.
  function table(headings, rows, className) {
    const body = rows instanceof HTMLTableSectionElement ? rows : el("tbody", null, rows);
    return el(
      "div",
      { class: "scroll" },
      el(
        "table",
        { class: className },
        el("thead", null, el("tr", null, headings.map((h) => el("th", { text: h })))),
        body,
      ),
    );
  }

  const enc = encodeURIComponent;

  // A page's hash, keeping the namespace the reader chose.
  function pageHash(path, namespace = state.namespace) {
    return namespace ? `${path}?namespace=${enc(namespace)}` : path;
  }

  // An API path scoped to the chosen namespace (the admin API's ?namespace=).
  function scoped(path, params) {
    const query = new URLSearchParams(params || {});
    if (state.namespace) query.set("namespace", state.namespace);
    const text = query.toString();
    return text ? `${path}?${text}` : path;
  }

  function time(seconds) {
    if (typeof seconds !== "number") return "";
    const date = new Date(seconds * 1000);
    return date.toLocaleTimeString([], { hour12: false });
  }

  function dateTime(seconds) {
    if (typeof seconds !== "number") return "";
    const date = new Date(seconds * 1000);
    return `${date.toLocaleDateString()} ${date.toLocaleTimeString([], { hour12: false })}`;
  }

  function bytes(n) {
    if (typeof n !== "number") return "";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function millis(value) {
    return typeof value === "number" ? value.toFixed(value < 10 ? 2 : 1) : "";
  }

  function brief(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) return value.map(brief).join(", ");
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function notice(text, isError) {
    const box = document.getElementById("notice");
    box.textContent = text;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = !text;
  }

  function debounce(fn, ms) {
    let timer = null;
    const run = () => {
      timer = null;
      fn();
    };
    const call = () => {
      if (timer === null) timer = setTimeout(run, ms);
    };
    call.cancel = () => {
      if (timer !== null) clearTimeout(timer);
      timer = null;
    };
    return call;
  }

  // The API

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET" && method !== "HEAD" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
    let payload;
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const response = await fetch(path, {
      method,
      headers,
      body: payload,
      credentials: "same-origin",
      cache: "no-store",
    });
    const type = response.headers.get("Content-Type") || "";
    const data = type.startsWith("application/json") ? await response.json() : await response.text();
    if (response.status === 401 && state.tokenRequired) showLogin();
    if (!response.ok) {
      const message = data && data.error ? data.error : `${response.status}`;
      throw new ApiError(response.status, message, data);
    }
    return data;
  }

  function servicesWith(view) {
    return Object.keys(state.services)
      .filter((name) => (state.services[name].views || []).includes(view))
      .sort();
  }

  // Signing in

  function showLogin() {
    document.getElementById("login").hidden = false;
    main.hidden = true;
    document.querySelector(".top").hidden = true;
    if (state.source) state.source.close();
    state.source = null;
    document.getElementById("token").focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const error = document.getElementById("login-error");
    error.textContent = "";
    const token = document.getElementById("token").value;
    try {
      const answer = await api("POST", "/ui/login", { token });
      state.csrf = answer.csrf;
      document.getElementById("token").value = "";
      const session = await api("GET", "/ui/session");
      enter(session);
    } catch (e) {
      error.textContent = e.status === 401 ? "Wrong token." : `Sign-in failed: ${e.message}`;
    }
  }

  async function signOut() {
    try {
      await api("POST", "/ui/logout");
    } finally {
      state.csrf = "";
      showLogin();
    }
  }

  function enter(session) {
    state.csrf = session.csrf || state.csrf;
    state.lastId = session.last_event_id || 0;
    document.getElementById("login").hidden = true;
    document.querySelector(".top").hidden = false;
    main.hidden = false;
    document.getElementById("logout").hidden = !state.tokenRequired;
    scope(hashNamespace());
    // The stream once the first page has asked for its lists: its backlog
    // would otherwise be read before them.  It starts from the session's
    // event id, so nothing emitted meanwhile is missed.
    const since = Math.max(0, state.lastId - 200);
    refreshServices(state.firstServices).then(() => {
      route();
      openStream(since);
    });
    state.firstServices = null;
    if (!state.started) {
      state.started = true;
      window.addEventListener("hashchange", route);
      setInterval(refreshServices, 2000);
    }
  }

  // Live events

  function openStream(since) {
    if (state.source) state.source.close();
    const live = document.getElementById("live");
    const source = new EventSource(scoped("/api/events/stream", { since }));
    source.onopen = () => {
      live.textContent = "live";
      live.classList.add("on");
    };
    source.onerror = () => {
      live.textContent = "reconnecting";
      live.classList.remove("on");
    };
    source.onmessage = (message) => {
      const event = JSON.parse(message.data);
      state.lastId = event.id;
      state.events.push(event);
      if (event.namespace && !state.namespacesSeen.has(event.namespace)) {
        state.namespacesSeen.add(event.namespace);
        document.getElementById("namespaces").append(el("option", { value: event.namespace }));
      }
      if (state.events.length > MAX_EVENTS) state.events.shift();
      for (const listener of state.listeners) listener(event);
    };
    state.source = source;
  }

  function onEvent(listener) {
    state.listeners.add(listener);
  }

  // Services and their rates

  async function refreshServices(prefetched) {
    if (main.hidden) return;
    let answer = prefetched;
    if (!answer) {
      try {
        answer = await api("GET", "/api/services");
      } catch (_) {
        return;
      }
    }
    const now = performance.now() / 1000;
    for (const [name, service] of Object.entries(answer.services)) {
      const total = service.counters.connections_total;
      const last = state.lastTotals[name];
      const rate = state.rates[name] || (state.rates[name] = []);
      if (last) rate.push(Math.max(0, (total - last.total) / Math.max(now - last.at, 0.001)));
      if (rate.length > RATE_POINTS) rate.shift();
      state.lastTotals[name] = { total, at: now };
    }
    const known = Object.keys(state.services).sort().join(",");
    state.services = answer.services;
    // Once the page shown has asked for its lists: a probe for each service
    // would otherwise take the browser's few connections to this host first.
    if (Object.keys(state.services).sort().join(",") !== known) setTimeout(probeRules);
    if (state.onServices) state.onServices();
  }

  // In the background, all at once: the first page does not wait for it.
  async function probeRules() {
    const names = Object.keys(state.services).sort();
    const answers = await Promise.all(
      names.map((name) => api("GET", `/api/services/${enc(name)}/rules`).then(
        () => true,
        () => false, // 404: this service (or this netd) has no rules API
      )),
    );
    state.rulesServices = names.filter((_, i) => answers[i]);
    document.querySelector('[data-page="rules"]').hidden = state.rulesServices.length === 0;
    if (main.dataset.page === "rules") route();
  }

  function sparkline(points) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${RATE_POINTS} 28`);
    svg.setAttribute("preserveAspectRatio", "none");
    const top = Math.max(1, ...points);
    const line = document.createElementNS(ns, "polyline");
    const offset = RATE_POINTS - points.length;
    line.setAttribute(
      "points",
      points.map((p, i) => `${offset + i},${(27 - (p / top) * 25).toFixed(1)}`).join(" "),
    );
    const title = document.createElementNS(ns, "title");
    title.textContent = `connections/s, peak ${top.toFixed(1)}`;
    svg.append(title, line);
    return svg;
  }

  function listenerText(listener) {
    const where = listener.port !== undefined ? `${listener.host}:${listener.port}` : listener.endpoint;
    return `${listener.transport} ${where}${listener.tls ? " tls" : ""}`;
  }

  const pages = {};

  pages.services = () => {
    const body = el("tbody");
    main.append(
      el("h1", { text: "Services" }),
      el(
        "div",
        { class: "panel scroll" },
        el(
          "table",
          { id: "services" },
          el(
            "thead",
            null,
            el(
              "tr",
              null,
              ["Service", "Type", "State", "Listeners", "Active", "Connections", "In", "Out", "Errors", "Rate"].map(
                (h) => el("th", { text: h }),
              ),
            ),
          ),
          body,
        ),
      ),
    );
    if (state.namespace) main.append(el("p", { class: "muted", text: "Counters count every namespace." }));
    const draw = () => {
      body.replaceChildren(
        ...Object.keys(state.services)
          .sort()
          .map((name) => {
            const s = state.services[name];
            const c = s.counters;
            return el(
              "tr",
              { "data-service": name },
              el("td", null, el("strong", { text: name })),
              el("td", { text: s.type }),
              el("td", { class: `state-${s.state}`, text: s.state }),
              el("td", null, s.listeners.map((l) => el("div", { text: listenerText(l) }))),
              el("td", { class: "num", text: c.connections_active }),
              el("td", { class: "num", text: c.connections_total }),
              el("td", { class: "num", text: bytes(c.bytes_in) }),
              el("td", { class: "num", text: bytes(c.bytes_out) }),
              el("td", { class: "num", text: c.errors }),
              el("td", null, sparkline(state.rates[name] || [])),
            );
          }),
      );
    };
    draw();
    state.onServices = draw;
    return () => {
      state.onServices = null;
    };
  };

  // Mail

  pages.mail = (args) => {
    const services = servicesWith("messages");
    if (services.length === 0) {
      main.append(el("h1", { text: "Mail" }), el("p", { class: "muted", text: "No service keeps mail." }));
      return null;
    }
    const service = services.includes(args[0]) ? args[0] : services[0];
    if (args[1]) return messageView(service, args[1]);
    return mailList(service, services);
  };

  function mailList(service, services) {
    const query = state.mailQuery;
    const inputs = {};
    const field = (name, label) => {
      inputs[name] = el("input", { name, type: "search", value: query[name], placeholder: label, "aria-label": label });
      return inputs[name];
    };
    const fresh = el("span", { class: "badge", hidden: true });
    const count = el("span", { class: "muted" });
    const body = el("tbody");
    const older = el("button", { type: "button", text: "Older ›" });
    const newer = el("button", { type: "button", text: "‹ Newer" });
    const chooser = el(
      "select",
      { "aria-label": "service", onchange: (e) => (location.hash = pageHash(`#/mail/${enc(e.target.value)}`)) },
      services.map((name) => el("option", { value: name, selected: name === service, text: name })),
    );
    const form = el(
      "form",
      { class: "toolbar", id: "mail-search" },
      services.length > 1 ? chooser : null,
      field("from", "From"),
      field("to", "To (address)"),
      field("subject", "Subject"),
      field("text", "Text"),
      el("button", { type: "submit", text: "Search" }),
      el("button", {
        type: "button",
        text: "Clear",
        onclick: () => {
          for (const name of Object.keys(inputs)) inputs[name].value = "";
          search();
        },
      }),
      el("span", { class: "spacer" }),
      fresh,
      state.namespace ? null : el("button", {
        type: "button",
        class: "danger",
        text: "Delete all",
        onclick: async () => {
          if (!window.confirm(`Delete every message of ${service}?`)) return;
          await api("DELETE", `/api/services/${enc(service)}/messages`);
          load();
        },
      }),
    );
    main.append(
      el("h1", { text: `Mail · ${service}${state.namespace ? ` · ${state.namespace}` : ""}` }),
      form,
      el(
        "div",
        { class: "panel" },
        table(["Received", "From", "To", "Subject", "Size"], body, "mail-list"),
        el("div", { class: "pager" }, newer, older, count),
      ),
    );
    let firstDrawn = false;

    async function load() {
      const params = { order: "newest", limit: PAGE_SIZE, offset: query.offset };
      for (const name of ["from", "to", "subject", "text"]) if (query[name]) params[name] = query[name];
      const path = scoped(`/api/services/${enc(service)}/messages`, params);
      const early = state.firstList && state.firstList.path === path ? state.firstList.answer : null;
      state.firstList = null;
      let answer;
      try {
        answer = (await early) || (await api("GET", path));
      } catch (e) {
        count.textContent = `Could not list: ${e.message}`;
        return;
      }
      body.replaceChildren(
        ...answer.messages.map((m) =>
          el(
            "tr",
            {
              class: "clickable",
              "data-id": m.id,
              onclick: () => (location.hash = pageHash(`#/mail/${enc(service)}/${enc(m.id)}`)),
            },
            el("td", { class: "num", text: dateTime(m.received) }),
            el("td", { text: m.from || "<>" }),
            el("td", { text: (m.to || []).join(", ") }),
            el("td", { class: "subject", text: m.subject || "(no subject)" }),
            el("td", { class: "num", text: bytes(m.size) }),
          ),
        ),
      );
      const first = answer.total ? query.offset + 1 : 0;
      count.textContent = `${first}-${query.offset + answer.messages.length} of ${answer.total}`;
      newer.disabled = query.offset === 0;
      older.disabled = query.offset + PAGE_SIZE >= answer.total;
      fresh.hidden = true;
      if (!firstDrawn) {
        firstDrawn = true;
        performance.mark("netd:mail-list");
      }
    }

    function search(event) {
      if (event) event.preventDefault();
      for (const name of Object.keys(inputs)) query[name] = inputs[name].value.trim();
      query.offset = 0;
      load();
    }

    form.addEventListener("submit", search);
    older.addEventListener("click", () => {
      query.offset += PAGE_SIZE;
      load();
    });
    newer.addEventListener("click", () => {
      query.offset = Math.max(0, query.offset - PAGE_SIZE);
      load();
    });
    const reload = debounce(load, 250);
    let unseen = 0;
    onEvent((event) => {
      if (event.service !== service || !event.type.startsWith("message.")) return;
      if (query.offset === 0) {
        reload();
      } else if (event.type === "message.accepted") {
        unseen += 1;
        fresh.textContent = `${unseen} new`;
        fresh.hidden = false;
      }
    });
    load();
    return reload.cancel;
  }

  function messageView(service, id) {
    const base = `/ui/messages/${enc(service)}/${enc(id)}`;
    const back = el("a", { href: pageHash(`#/mail/${enc(service)}`), text: "‹ Back to the list" });
    const remove = el("button", {
      type: "button",
      class: "danger",
      id: "delete-message",
      text: "Delete",
      onclick: async () => {
        try {
          await api("DELETE", `/api/services/${enc(service)}/messages/${enc(id)}`);
          location.hash = pageHash(`#/mail/${enc(service)}`);
        } catch (e) {
          notice(`Could not delete: ${e.message}`, true);
        }
      },
    });
    const holder = el("div", { class: "panel" }, el("p", { class: "muted", text: "Loading…" }));
    main.append(el("div", { class: "toolbar" }, back, el("span", { class: "spacer" }), remove), holder);
    api("GET", base).then(
      (info) => holder.replaceChildren(...messageParts(service, id, base, info).flat()),
      (e) => holder.replaceChildren(el("p", { class: "error", text: `Could not read the message: ${e.message}` })),
    );
    return null;
  }

  function messageParts(service, id, base, info) {
    const meta = el(
      "dl",
      { class: "meta" },
      [
        ["From", info.from],
        ["To", info.to],
        ["Subject", info.subject],
        ["Date", info.date],
        ["Size", bytes(info.size)],
      ]
        .filter(([, v]) => v)
        .map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]),
    );
    const extras = [];
    if (info.codes.length) {
      extras.push(el("p", null, "Codes: ", info.codes.map((c) => [el("span", { class: "badge code", text: c }), " "])));
    }
    if (info.links.length) {
      extras.push(
        el("details", null, el("summary", { text: `Links (${info.links.length})` }),
          el("ul", null, info.links.map((link) => el("li", null, el("a", { href: link, text: link, target: "_blank", rel: "noopener noreferrer" })))),
        ),
      );
    }
    const tabs = el("div", { class: "tabs", role: "tablist" });
    const shown = el("div", { class: "tab-body" });
    const views = {};
    if (info.has_html) {
      views.HTML = () => {
        const frame = el("iframe", {
          class: "mail",
          sandbox: "",
          referrerpolicy: "no-referrer",
          title: "HTML part",
          src: `${base}/html`,
        });
        const remote = el("button", {
          type: "button",
          text: "Load remote content",
          onclick: () => {
            frame.src = `${base}/html?remote=1`;
            remote.disabled = true;
            blocked.textContent = "Remote content loaded (scripts stay off).";
          },
        });
        const blocked = el("span", { class: "muted", text: "Remote images and styles are blocked." });
        return [el("div", { class: "toolbar" }, blocked, remote), frame];
      };
    }
    views.Text = () => [
      el("pre", { class: "mail-text", text: info.text || "(no text part)" }),
      info.text_truncated ? el("p", { class: "muted", text: "Only the start of the text is shown." }) : null,
    ];
    views.Headers = () => [
      table(["Name", "Value"], info.headers.map(([n, v]) => el("tr", null, el("td", { text: n }), el("td", { text: v }))), "headers"),
    ];
    views.Raw = () => {
      const pre = el("pre", { class: "raw", text: "Loading…" });
      api("GET", `/api/services/${enc(service)}/messages/${enc(id)}`).then(
        (raw) => (pre.textContent = raw),
        (e) => (pre.textContent = `Could not read: ${e.message}`),
      );
      return [pre];
    };
    views[`Attachments (${info.attachments.length})`] = () =>
      info.attachments.length
        ? [
            table(
              ["File", "Type", "Size"],
              info.attachments.map((a) =>
                el(
                  "tr",
                  null,
                  el("td", null, el("a", { href: `${base}/parts/${a.index}`, download: a.filename, text: a.filename })),
                  el("td", { text: a.content_type }),
                  el("td", { class: "num", text: bytes(a.size) }),
                ),
              ),
              "attachments",
            ),
          ]
        : [el("p", { class: "muted", text: "No attachments." })];
    const show = (name) => {
      for (const button of tabs.children) button.classList.toggle("current", button.dataset.tab === name);
      shown.replaceChildren(...views[name]().filter(Boolean));
    };
    for (const name of Object.keys(views)) {
      tabs.append(el("button", { type: "button", role: "tab", "data-tab": name, text: name, onclick: () => show(name) }));
    }
    show(Object.keys(views)[0]);
    return [el("h1", { class: "subject", text: info.subject || "(no subject)" }), meta, extras, tabs, shown];
  }

  // Per-service lists: HTTP requests, DNS queries, sessions

  function servicePanels(title, view, empty, draw, nothingYet = "Nothing yet.") {
    main.append(el("h1", { text: title }));
    const services = servicesWith(view);
    if (services.length === 0) {
      main.append(el("p", { class: "muted", text: empty }));
      return null;
    }
    const loads = {};
    for (const service of services) {
      const holder = el("div");
      const clear = el("button", {
        type: "button",
        class: "danger",
        text: "Clear",
        onclick: async () => {
          await api("DELETE", `/api/services/${enc(service)}/${view}`);
          loads[service]();
        },
      });
      // Clearing reaches every namespace's entries: not offered while scoped to one.
      const canClear = view !== "sessions" && !state.namespace;
      main.append(
        el(
          "section",
          { class: "panel", "data-service": service },
          el("div", { class: "toolbar" }, el("h2", { text: service }), el("span", { class: "spacer" }), canClear ? clear : null),
          holder,
        ),
      );
      const load = async () => {
        try {
          const answer = await api("GET", scoped(`/api/services/${enc(service)}/${view}`));
          const rows = Array.isArray(answer) ? answer : answer[view] || [];
          const none = state.namespace ? `Nothing in namespace ${state.namespace}.` : nothingYet;
          holder.replaceChildren(rows.length ? draw(rows.slice().reverse()) : el("p", { class: "muted", text: none }));
        } catch (e) {
          holder.replaceChildren(el("p", { class: "error", text: e.message }));
        }
      };
      loads[service] = debounce(load, 250);
      load();
    }
    onEvent((event) => {
      if (loads[event.service]) loads[event.service]();
    });
    return () => Object.values(loads).forEach((load) => load.cancel());
  }

  pages.http = () => {
    // Rows opened stay open when the list is drawn again for a new request.
    const opened = new Set();
    return servicePanels("HTTP requests", "requests", "No http service records requests.", (rows) => {
      const body = el("tbody");
      for (const r of rows) {
        const key = `${r.time} ${r.client} ${r.method} ${r.path}`;
        const detail = el(
          "tr",
          { hidden: !opened.has(key) },
          el(
            "td",
            { colspan: 8 },
            table(["Header", "Value"], (r.headers || []).map(([n, v]) => el("tr", null, el("td", { text: n }), el("td", { text: v }))), "headers"),
            el("pre", { class: "body", text: r.body || "(no body)" }),
            r.body_truncated ? el("p", { class: "muted", text: `Body cut at ${bytes(r.body.length)} of ${bytes(r.body_size)}.` }) : null,
          ),
        );
        body.append(
          el(
            "tr",
            {
              class: "clickable",
              onclick: () => {
                detail.hidden = !detail.hidden;
                if (detail.hidden) opened.delete(key);
                else opened.add(key);
              },
            },
            el("td", { class: "num", text: time(r.time) }),
            el("td", { class: "hide-narrow", text: r.client }),
            el("td", { text: r.method }),
            el("td", { class: "subject", text: r.path }),
            el("td", { class: "num", text: r.status }),
            el("td", { class: "num", text: millis(r.duration_ms) }),
            el("td", { class: "hide-narrow", text: r.protocol }),
            el("td", { class: "num", text: bytes(r.body_size) }),
          ),
          detail,
        );
      }
      return el(
        "div",
        { class: "scroll" },
        el(
          "table",
          { class: "requests" },
          el("thead", null, el("tr", null, ["Time", "Client", "Method", "Path", "Status", "ms", "Protocol", "Body"].map((h) => el("th", { text: h })))),
          body,
        ),
      );
    });
  };

  pages.dns = () =>
    servicePanels("DNS queries", "queries", "No dns service logs queries.", (rows) =>
      table(
        ["Time", "Client", "Transport", "Name", "Type", "Rcode", "Source", "Answer", "ms"],
        rows.map((q) =>
          el(
            "tr",
            null,
            el("td", { class: "num", text: time(q.time) }),
            el("td", { text: q.client }),
            el("td", { text: q.transport }),
            el("td", { text: q.name }),
            el("td", { text: q.qtype }),
            el("td", { text: q.rcode }),
            el("td", { text: q.source }),
            el("td", null, (q.answer || []).map((a) => el("div", { text: a }))),
            el("td", { class: "num", text: millis(q.latency_ms) }),
          ),
        ),
        "queries",
      ),
      "Nothing yet (a dns service keeps its queries with query_log: true).",
    );

  pages.sessions = () =>
    servicePanels("FTP and chat sessions", "sessions", "No ftp or chat service.", (rows) => {
      const keys = [...new Set(rows.flatMap((row) => Object.keys(row)))];
      return table(
        keys,
        rows.map((row) =>
          el("tr", null, keys.map((k) => el("td", { text: TIME_KEYS.has(k) ? dateTime(row[k]) : brief(row[k]) }))),
        ),
        "sessions",
      );
    });

  // The journal

  pages.journal = () => {
    const serviceFilter = el(
      "select",
      { "aria-label": "service" },
      el("option", { value: "", text: "every service" }),
      ["admin", "netd", ...Object.keys(state.services).sort()].map((name) => el("option", { value: name, text: name })),
    );
    const typeFilter = el("input", { type: "search", placeholder: "type contains", "aria-label": "type" });
    const paused = el("input", { type: "checkbox" });
    const body = el("tbody");
    const matches = (event) =>
      (!serviceFilter.value || event.service === serviceFilter.value) &&
      (!typeFilter.value || event.type.includes(typeFilter.value.trim()));
    const row = (event) => {
      const { id, time: at, service, type, ...fields } = event;
      return el(
        "tr",
        { "data-id": id },
        el("td", { class: "num", text: id }),
        el("td", { class: "num", text: time(at) }),
        el("td", { text: service }),
        el("td", { text: type }),
        el("td", { text: JSON.stringify(fields) }),
      );
    };
    const redraw = () => body.replaceChildren(...state.events.filter(matches).reverse().map(row));
    serviceFilter.addEventListener("change", redraw);
    typeFilter.addEventListener("input", redraw);
    main.append(
      el("h1", { text: "Journal" }),
      el("div", { class: "toolbar" }, serviceFilter, typeFilter, el("label", null, paused, "pause")),
      el("div", { class: "panel" }, table(["#", "Time", "Service", "Type", "Fields"], body, "journal")),
    );
    redraw();
    onEvent((event) => {
      if (paused.checked || !matches(event)) return;
      body.prepend(row(event));
      while (body.children.length > MAX_EVENTS) body.lastChild.remove();
    });
    return null;
  };

  // Rules and scenarios (issue #16's API), shown only where the API answers.

  pages.rules = () => {
    main.append(el("h1", { text: "Rules and scenarios" }));
    if (state.rulesServices.length === 0) {
      main.append(el("p", { class: "muted", text: "This netd has no rules API." }));
      return null;
    }
    const scenarios = el("div");
    main.append(el("section", { class: "panel" }, el("h2", { text: "Scenarios" }), scenarios));
    const loadScenarios = async () => {
      let answer;
      try {
        answer = await api("GET", "/api/scenarios");
      } catch (e) {
        scenarios.replaceChildren(el("p", { class: "muted", text: e.message }));
        return;
      }
      const found = answer && answer.scenarios !== undefined ? answer.scenarios : answer;
      const pairs = (
        Array.isArray(found)
          ? found.map((s) => [s.name, s.state])
          : Object.entries(found || {}).map(([name, s]) => [name, typeof s === "object" && s ? s.state : s])
      ).filter(([name]) => !state.namespace || name.endsWith(`@${state.namespace}`));
      scenarios.replaceChildren(
        pairs.length
          ? table(
              ["Scenario", "State", ""],
              pairs.map(([name, current]) => {
                const input = el("input", { value: current || "", "aria-label": `state of ${name}` });
                return el(
                  "tr",
                  null,
                  el("td", { text: name }),
                  el("td", null, input),
                  el(
                    "td",
                    null,
                    el("button", {
                      type: "button",
                      text: "Set",
                      onclick: () => act(() => api("PUT", `/api/scenarios/${enc(name)}`, { state: input.value }), loadScenarios),
                    }),
                  ),
                );
              }),
              "scenarios",
            )
          : el("p", { class: "muted", text: "No scenarios." }),
        el("button", { type: "button", text: "Reset all", onclick: () => act(() => api("POST", "/api/scenarios/reset"), loadScenarios) }),
      );
    };
    loadScenarios();

    const chooser = el(
      "select",
      { id: "rule-service", "aria-label": "service" },
      state.rulesServices.map((name) => el("option", { value: name, text: `${name} (${state.services[name].type})` })),
    );
    const rule = el("textarea", { id: "rule-text", "aria-label": "the rule, as JSON" });
    const errors = el("div", { id: "rule-errors", class: "error" });
    const example = () => {
      const kind = (state.services[chooser.value] || {}).type;
      rule.placeholder = RULE_EXAMPLES[kind] || RULE_EXAMPLES.other;
    };
    chooser.addEventListener("change", example);
    example();
    const inForce = el("div");
    const add = async (event) => {
      event.preventDefault();
      errors.textContent = "";
      let body;
      try {
        body = JSON.parse(rule.value);
      } catch (e) {
        errors.textContent = `Not JSON: ${e.message}`;
        return;
      }
      // A rule added while scoped fires only on that namespace's traffic.
      if (state.namespace && body && typeof body === "object" && !Array.isArray(body) && !("namespace" in body)) {
        body.namespace = state.namespace;
      }
      try {
        await api("POST", `/api/services/${enc(chooser.value)}/rules`, body);
        rule.value = "";
        load();
      } catch (e) {
        const listed = e.body && Array.isArray(e.body.errors) ? e.body.errors : [];
        errors.textContent = listed.length ? listed.map((x) => `${x.path}: ${x.message}`).join("\n") : e.message;
      }
    };
    main.append(
      el(
        "section",
        { class: "panel" },
        el("h2", { text: "Add a rule" }),
        el(
          "form",
          { id: "rule-form", onsubmit: add },
          el("div", { class: "toolbar" }, el("label", null, "Service ", chooser)),
          rule,
          errors,
          el("div", { class: "toolbar" }, el("button", { type: "submit", text: "Add rule" })),
        ),
      ),
      el("section", { class: "panel" }, el("h2", { text: "Rules in force" }), inForce),
    );

    const load = debounce(async () => {
      const found = [];
      for (const service of state.rulesServices) {
        const answer = await api("GET", scoped(`/api/services/${enc(service)}/rules`)).catch(() => ({ rules: [] }));
        for (const r of Array.isArray(answer) ? answer : answer.rules || []) found.push([service, r]);
      }
      inForce.replaceChildren(
        found.length
          ? table(
              ["Service", "Id", "Rule", "Source", "Fired", ""],
              found.map(([service, r]) => {
                const { id, fired, source, spent, ...rest } = r;
                return el(
                  "tr",
                  { "data-rule": id, "data-service": service },
                  el("td", { text: service }),
                  el("td", { text: id }),
                  el("td", null, el("code", { text: JSON.stringify(rest) })),
                  el("td", { text: source }),
                  el("td", { class: "num rule-fired", text: spent ? `${fired} (spent)` : fired }),
                  el(
                    "td",
                    null,
                    el("button", {
                      type: "button",
                      class: "danger",
                      text: "Delete",
                      onclick: () => act(() => api("DELETE", `/api/services/${enc(service)}/rules/${enc(id)}`), load),
                    }),
                  ),
                );
              }),
              "rules",
            )
          : el("p", { class: "muted", text: "No rules in force." }),
      );
    }, 100);
    load();
    onEvent((event) => {
      if (event.type === "rule.fired") load();
      if (event.type === "rule.fired" && event.scenario) loadScenarios();
    });
    return load.cancel;
  };

  async function act(change, then) {
    try {
      await change();
    } catch (e) {
      notice(e.message, true);
    }
    then();
  }

  // Reloading the map

  async function reloadMap() {
    try {
      const r = await api("POST", "/api/reload");
      const parts = ["started", "restarted", "stopped", "unchanged"]
        .filter((k) => r[k] && r[k].length)
        .map((k) => `${k}: ${r[k].join(", ")}`);
      notice(`Reloaded. ${parts.join("; ")}`, false);
      refreshServices();
    } catch (e) {
      const errors = e.body && Array.isArray(e.body.errors) ? e.body.errors : [e.message];
      notice(`Reload refused, the running map stays:\n${errors.join("\n")}`, true);
    }
  }

  // Routing

  function route() {
    if (main.hidden) return;
    const [path] = location.hash.replace(/^#\/?/, "").split("?", 1);
    const [page, ...args] = path.split("/").map(decodeURIComponent);
    scope(hashNamespace());
    const name = Object.hasOwn(pages, page) ? page : "services";
    if (state.cleanup) state.cleanup();
    state.cleanup = null;
    state.listeners.clear();
    state.onServices = null;
    for (const link of document.querySelectorAll("#nav a")) {
      link.classList.toggle("current", link.dataset.page === name);
      link.setAttribute("href", pageHash(`#/${link.dataset.page}`));
    }
    main.replaceChildren();
    main.dataset.page = name;
    state.cleanup = pages[name](args) || null;
  }

  function hashNamespace() {
    const query = location.hash.split("?", 2)[1];
    return new URLSearchParams(query || "").get("namespace") || "";
  }

  // Scope every page and the live stream to one namespace ("": all of them).
  // The journal kept so far is another scope's: the stream starts again.
  function scope(namespace) {
    if (namespace === state.namespace) return;
    const first = state.namespace === null;
    state.namespace = namespace;
    document.getElementById("namespace").value = namespace;
    document.querySelector(".top").classList.toggle("scoped", Boolean(namespace));
    if (first) return;
    state.mailQuery.offset = 0;
    state.events = [];
    openStream(Math.max(0, state.lastId - 200));
  }

  // The reader chose a namespace: the same page, in its scope.
  function chooseNamespace(event) {
    if (event) event.preventDefault();
    const namespace = document.getElementById("namespace").value.trim().toLowerCase();
    const [path] = location.hash.split("?", 1);
    const target = pageHash(path || "#/services", namespace);
    if (target !== location.hash) location.hash = target;
  }

  async function start() {
    document.getElementById("login-form").addEventListener("submit", signIn);
    document.getElementById("logout").addEventListener("click", signOut);
    document.getElementById("reload").addEventListener("click", reloadMap);
    document.getElementById("notice").addEventListener("click", () => notice(""));
    document.getElementById("namespace-form").addEventListener("submit", chooseNamespace);
    document.getElementById("namespace").addEventListener("change", chooseNamespace);
    // Asked together: a signed-in page needs both before its first view, and
    // a page opened on a mail list (a link, a reload) its first 50 as well.
    const services = api("GET", "/api/services").catch(() => null);
    scope(hashNamespace());
    const [page, listed, id] = location.hash.replace(/^#\/?/, "").split("?", 1)[0].split("/");
    if (page === "mail" && listed && !id) {
      const first = { order: "newest", limit: PAGE_SIZE, offset: 0 };
      // As the hash spells the service: a name spelt otherwise is asked for again.
      const path = scoped(`/api/services/${listed}/messages`, first);
      state.firstList = { path, answer: api("GET", path).catch(() => null) };
    }
    const session = await api("GET", "/ui/session");
    state.tokenRequired = session.token_required;
    state.firstServices = await services;
    if (!session.signed_in) {
      showLogin();
      return;
    }
    enter(session);
  }

  start();
})();
