// Shared by the three consoles: calls to the service that served the page (same origin),
// with the API key when the service wants one, and one place to show what went wrong.
"use strict";

const api = {
  key: sessionStorage.getItem("apiKey") || null,

  // GET /info once; when the service says POSTs need a key, ask for it before the first call.
  async start() {
    const info = await (await fetch("/info")).json();
    if (info.auth && info.auth !== "none" && !this.key) await this.askKey("This service needs its API key.");
    return info;
  },

  // POST a JSON object or a FormData; returns the Response. A 401 asks for the key again.
  async post(path, body, accept) {
    for (;;) {
      const headers = {};
      if (this.key) headers.Authorization = "Bearer " + this.key;
      if (accept) headers.Accept = accept;
      let payload = body;
      if (!(body instanceof FormData)) {
        headers["Content-Type"] = "application/json";
        payload = JSON.stringify(body);
      }
      const response = await fetch(path, { method: "POST", headers, body: payload });
      if (response.status === 401) {
        await this.askKey("The API key was refused; enter it again.");
        continue;
      }
      if (!response.ok) throw new Error(await errorText(response));
      return response;
    }
  },

  async json(path, body) {
    return (await this.post(path, body)).json();
  },

  askKey(why) {
    let form = document.getElementById("key-form");
    if (!form) {  // made on first need, under the page's header
      form = el("form", { id: "key-form" }, el("span", { class: "why" }), " ",
        el("label", {}, "API key ", el("input", { type: "password", autocomplete: "off" })), el("button", { text: "Use it" }));
      document.querySelector("header").after(form);
    }
    form.querySelector(".why").textContent = why;
    form.hidden = false;
    form.querySelector("input").focus();
    return new Promise((resolve) => {
      form.onsubmit = (event) => {
        event.preventDefault();
        this.key = form.querySelector("input").value.trim() || null;
        if (this.key) sessionStorage.setItem("apiKey", this.key);
        form.hidden = true;
        resolve();
      };
    });
  },
};

async function errorText(response) {
  try {
    const error = (await response.json()).error;
    return `${error.status} ${error.code}: ${error.message}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function say(message, ok = false) {
  const status = document.getElementById("status");
  status.textContent = message || "";
  status.className = ok ? "ok" : "";
}

// Run an async handler, showing its error instead of failing silently.
function guarded(handler) {
  return async (...args) => {
    try {
      say("");
      await handler(...args);
    } catch (error) {
      say(error.message);
    }
  };
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function download(blob, filename) {
  const link = el("a", { href: URL.createObjectURL(blob), download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
