// Classifier console: a photo (upload or webcam), its classes, its faces with their names,
// teaching a name from it, and the taught names with a way to forget them.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null, photo = null, picture = null, faces = [];
let latest = { classify: 0, check: 0 };  // answers to an older request (an older photo) are dropped

function teachModel() {
  return $("teach-model").value;
}

function photoForm(extra = {}) {
  const form = new FormData();
  form.append("images", photo.blob, photo.name);
  for (const [key, value] of Object.entries(extra)) if (value !== undefined && value !== null) form.append(key, value);
  return form;
}

async function usePhoto(blob, name) {
  photo = { blob, name };
  picture = await createImageBitmap(blob);
  faces = [];
  draw();
  await Promise.all([classify(), check()]);
}

// The photo scaled into the canvas, with each face's box and name.
function draw() {
  const canvas = $("photo"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (!picture) return;
  const scale = Math.min(canvas.width / picture.width, canvas.height / picture.height);
  g.drawImage(picture, 0, 0, picture.width * scale, picture.height * scale);
  g.lineWidth = 3;
  g.font = "15px system-ui";
  faces.forEach((face, i) => {
    const [x0, y0, x1, y1] = face.box.map((v) => v * scale);
    const label = face.name ? `${i}: ${face.name}${face.matched ? "" : "?"}` : `${i}: ${face.too_small ? "too small" : "unknown"}`;
    g.strokeStyle = face.matched ? "#1f7a3d" : "#c98a2b";
    g.strokeRect(x0, y0, x1 - x0, y1 - y0);
    g.fillStyle = g.strokeStyle;
    g.fillRect(x0, Math.max(0, y0 - 20), g.measureText(label).width + 8, 20);
    g.fillStyle = "#fff";
    g.fillText(label, x0 + 4, Math.max(15, y0 - 5));
  });
}

async function classify() {
  const classifiers = (info.models || []).filter((m) => m.kind === "classifier");
  if (!classifiers.length) return;
  const ticket = ++latest.classify;
  const answer = await api.json("/classify", photoForm({ top_k: 5 }));
  if (ticket !== latest.classify) return;
  $("classes-title").textContent = `Classes: ${answer.model} version ${answer.version}`;
  if (answer.in_domain && answer.in_domain[0] === false) {  // the model does not know this kind of image
    const guess = answer.predictions[0][0];
    $("classes").replaceChildren(el("tr", {}, el("th", { text: "Not clothing" }),
      el("td", { class: "muted", text: `domain score ${answer.domain_score[0].toFixed(4)} < ` +
        `${answer.domain_threshold}, unlike what ${answer.model} learnt (its guess: ${guess.label} ` +
        `${(100 * guess.score).toFixed(0)}%)` })));
    return;
  }
  $("classes").replaceChildren(...answer.predictions[0].map((p) => el("tr", {},
    el("th", { text: p.label }), el("td", {}, el("div", { class: "bar", "data-score": p.score.toFixed(3) })),
    el("td", { class: "score", text: `${(100 * p.score).toFixed(1)}%` }))));
  // Bar widths set through the CSSOM: the page's policy refuses inline style attributes, not this.
  for (const bar of $("classes").querySelectorAll(".bar")) bar.style.width = `${Math.max(2, 100 * bar.dataset.score)}%`;
}

async function check() {
  const model = teachModel();
  if (!model || !photo) return;
  const ticket = ++latest.check;
  const answer = await api.json("/check", photoForm({ model }));
  if (ticket !== latest.check) return;
  const result = answer.results[0];
  if (result.faces) {
    faces = result.faces;
    const named = faces.map((f, i) => `${i}: ${f.name ? `${f.name} (${f.matched ? "" : "not "}within ` +
      `${answer.threshold}, distance ${f.distance})` : f.too_small ? "too small to name" : "unknown"}`);
    $("faces-note").textContent = faces.length ? `${faces.length} face(s): ${named.join("; ")}. Green boxes are ` +
      `taught names within the ${answer.metric} threshold.` : "no face found";
    $("face").replaceChildren(...faces.map((f, i) => el("option", { value: String(i), text: `${i}: ${f.name || "unknown"}` })));
    $("face-choice").hidden = faces.length < 2;
  } else {
    faces = [];
    $("faces-note").textContent = result.name ? `nearest taught: ${result.name} (${answer.metric} ` +
      `${result.confidence}, ${result.matched ? "a match" : "not close enough"})` : "nothing taught to this model yet";
    $("face-choice").hidden = true;
  }
  draw();
}

async function teach() {
  if (!photo) throw new Error("upload a photo first");
  const name = $("name").value.trim();
  if (!name) throw new Error("give the name to teach");
  const face = !$("face-choice").hidden ? $("face").value : undefined;
  const answer = await api.json("/teach", photoForm({ name, model: teachModel(), face }));
  say(`taught ${answer.name}: ${answer.examples} example(s) in all for ${answer.model}`, true);
  await Promise.all([listTaught(), check()]);
}

async function listTaught() {
  const model = teachModel();
  const answer = await api.json("/taught", { model });
  const rows = answer.names.map(({ name, examples }) => {
    const forget = el("button", { class: "secondary", text: "Forget" });
    forget.onclick = guarded(async () => {
      await api.json("/forget", { name, model });
      say(`forgot ${name}`, true);
      await Promise.all([listTaught(), check()]);
    });
    return el("tr", { "data-name": name }, el("th", { text: name }), el("td", { text: `${examples} example(s)` }),
      el("td", {}, forget));
  });
  $("taught").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "muted", text: `nothing taught to ${model}` }))]));
}

async function startCamera() {
  if (!navigator.mediaDevices?.getUserMedia) throw new Error("this browser gives no webcam to this page (it needs https or localhost)");
  const stream = await navigator.mediaDevices.getUserMedia({ video: true });
  $("video").srcObject = stream;
  $("video").hidden = false;
  $("snap").hidden = false;
}

async function snap() {
  const video = $("video"), canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.92));
  await usePhoto(blob, "webcam.jpg");
}

async function main() {
  info = await api.start();
  const teachable = info.teach?.models?.map((m) => m.model) || [];
  for (const name of teachable) $("teach-model").append(el("option", { value: name, text: name }));
  if (info.teach?.default_model) $("teach-model").value = info.teach.default_model;
  $("file").onchange = guarded(async () => {
    const file = $("file").files[0];
    if (file) await usePhoto(file, file.name);
  });
  $("teach-model").onchange = guarded(async () => Promise.all([listTaught(), check()]));
  $("teach").onclick = guarded(teach);
  $("camera").onclick = guarded(startCamera);
  $("snap").onclick = guarded(snap);
  if (teachable.length) await listTaught();
}

guarded(main)();
