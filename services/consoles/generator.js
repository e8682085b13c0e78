// Generator console: a grid by seed (and class), a seed slider, an animation between two seeds
// or two classes, downloads.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null, animation = null, pending = null;
let latest = { grid: 0, frames: 0 };  // answers to an older request are dropped (they may arrive last)

function options() {
  return { model: $("model").value, truncation: Number($("truncation").value) || 1 };
}

// A class select's value as a request field; "" (by seed) leaves the field out.
function chosen(id, field) {
  return $(id).value === "" ? {} : { [field]: Number($(id).value) };
}

// The class selects follow the model: its classes, or hidden for an unconditional model.
function fillClasses() {
  const classes = info.generators?.[$("model").value]?.classes || [];
  for (const id of ["label", "label-a", "label-b"]) {
    $(id).replaceChildren(el("option", { value: "", text: "by seed" }),
      ...classes.map((name, i) => el("option", { value: String(i), text: name })));
  }
  for (const row of document.querySelectorAll(".classes")) row.hidden = classes.length === 0;
}

async function generate() {
  const seed = Number($("seed").value) || 0, n = Number($("count").value) || 1;
  const ticket = ++latest.grid;
  const answer = await api.json("/generate", { n, seed, format: "json", ...options(), ...chosen("label", "label") });
  if (ticket !== latest.grid) return;
  const caption = (i) => `seed ${answer.seeds[i]}` + (answer.labels ? `, ${answer.labels[i]}` : "");
  $("grid").replaceChildren(...answer.images.map((image, i) =>
    el("figure", {}, el("img", { src: "data:image/png;base64," + image, alt: `seed ${answer.seeds[i]}` }),
      el("figcaption", { text: caption(i) }))));
  say(`${answer.images.length} images from seed ${seed}, ${answer.model} version ${answer.version}`, true);
}

async function downloadPng() {
  const seed = Number($("seed").value) || 0, n = Number($("count").value) || 1;
  const response = await api.post("/generate", { n, seed, format: "png", ...options(), ...chosen("label", "label") });
  download(await response.blob(), `generated-seed${seed}-n${n}.png`);
}

function interpolation(format) {
  return { seed_a: Number($("seed-a").value) || 0, seed_b: Number($("seed-b").value) || 0,
           steps: Number($("steps").value) || 16, method: $("method").value, format, ...options(),
           ...chosen("label-a", "label_a"), ...chosen("label-b", "label_b") };
}

async function interpolate() {
  const ticket = ++latest.frames;
  const answer = await api.json("/interpolate", interpolation("json"));
  if (ticket !== latest.frames) return;
  clearInterval(animation);
  let frame = 0;
  const show = () => {
    $("animation").src = "data:image/png;base64," + answer.frames[frame];
    $("frame").textContent = `${frame + 1} of ${answer.frames.length}`;
    frame = (frame + 1) % answer.frames.length;
  };
  show();
  animation = setInterval(show, 100);
}

async function downloadGif() {
  const body = interpolation("gif");
  const response = await api.post("/interpolate", body);
  download(await response.blob(), `interpolation-${body.seed_a}-${body.seed_b}.gif`);
}

function showCard() {
  const model = (info.models || []).find((m) => m.name === $("model").value);
  const table = $("card");
  table.replaceChildren();
  if (!model) return;
  const metrics = model.metrics || {}, contract = model.contract || {};
  const figure = (x) => (typeof x === "number" ? x.toFixed(1) : "-");
  const rows = [
    ["version", model.version],
    ["FID (lower is better)", `${figure(metrics.fid)} (floor ${figure(metrics.floor?.fid)}, untrained ${figure(metrics.ceiling?.fid)})`],
    ["image", `${contract.image_size}x${contract.image_size}, ${contract.channels} channel(s)`],
    ["latent", `${contract.latent_dim} numbers from the seed`],
    ["classes", contract.classes ? contract.classes.join(", ") : "none (unconditional)"],
    ["class fidelity", metrics.class_fidelity ? `${(100 * metrics.class_fidelity.agreement).toFixed(1)}% ` +
      `(real images ${(100 * metrics.class_fidelity_real.agreement).toFixed(1)}%)` : "-"],
    ["trained with", model.trained_with || "-"],
  ];
  for (const [name, value] of rows) table.append(el("tr", {}, el("th", { text: name }), el("td", { text: String(value) })));
}

async function main() {
  info = await api.start();
  for (const name of Object.keys(info.generators || {})) $("model").append(el("option", { value: name, text: name }));
  $("seed-slider").max = String(Math.min(999, info.limits?.seed?.[1] ?? 999));
  $("model").onchange = guarded(async () => { fillClasses(); showCard(); await generate(); });
  $("label").onchange = guarded(generate);
  $("generate").onclick = guarded(generate);
  $("download-png").onclick = guarded(downloadPng);
  $("interpolate").onclick = guarded(interpolate);
  $("download-gif").onclick = guarded(downloadGif);
  $("seed").onchange = guarded(async () => { $("seed-slider").value = $("seed").value; await generate(); });
  // The slider asks while it moves, but never more than one request at a time.
  $("seed-slider").oninput = () => {
    $("seed").value = $("seed-slider").value;
    if (pending) return;
    pending = guarded(generate)().finally(() => {
      pending = null;
      if ($("grid").querySelector("img")?.alt !== `seed ${$("seed").value}`) $("seed").onchange();
    });
  };
  fillClasses();
  showCard();
  await generate();
}

guarded(main)();
