// Policy console: CartPole played live, each action from the served policy.
"use strict";

const $ = (id) => document.getElementById(id);
const env = new CartPole();
let info = null, running = false, lastAction = null;

// Policies that play CartPole from its state (the page runs the physics, not a camera).
function cartpolePolicies(info) {
  return Object.entries(info.policies || {})
    .filter(([, p]) => p.env_id === "CartPole-v1" && p.observation_space?.dtype !== "uint8").map(([name]) => name);
}

function showCard() {
  const model = (info.models || []).find((m) => m.name === $("model").value);
  const table = $("card");
  table.replaceChildren();
  if (!model) return;
  const metrics = model.metrics || {};
  const rows = [
    ["version", model.version],
    ["mean return", metrics.mean_return !== undefined ?
      `${metrics.mean_return} ± ${metrics.std_return} over ${metrics.episodes} episodes` : "-"],
    ["lowest return", metrics.min_return ?? "-"],
    ["trained with", model.trained_with || "-"],
    ["runs on", model.provider],
  ];
  for (const [name, value] of rows) table.append(el("tr", {}, el("th", { text: name }), el("td", { text: String(value) })));
}

function show() {
  $("return").textContent = String(env.total);
  $("steps").textContent = String(env.steps);
  $("state").textContent = env.terminated ? "the pole fell or the cart left the track" :
    env.truncated ? "500 steps: CartPole-v1's limit" : running ? "running" : "ready";
  drawCartPole($("world"), env, lastAction);
}

function reset() {
  running = false;
  lastAction = null;
  env.reset(Number($("seed").value) || 0);
  $("run").textContent = "Run";
  show();
}

async function act() {
  const body = { observations: [env.observation()], model: $("model").value, deterministic: $("deterministic").checked };
  if (!body.deterministic) body.seed = (Number($("seed").value) || 0) * 1000 + env.steps;
  const answer = await api.json("/act", body);
  lastAction = answer.actions[0];
  $("action").textContent = lastAction === 1 ? "1: push right" : "0: push left";
  $("probabilities").textContent = answer.probabilities ? answer.probabilities[0].map((p) => p.toFixed(3)).join(", ") : "-";
  $("value").textContent = answer.values[0].toFixed(2);
  $("version").textContent = `${answer.model} version ${answer.version}`;
  env.step(lastAction);
}

async function step() {
  if (env.done) reset();
  await act();
  show();
}

async function run() {
  if (running) {
    running = false;
    $("run").textContent = "Run";
    return show();
  }
  if (env.done) reset();
  running = true;
  $("run").textContent = "Pause";
  try {
    while (running && !env.done) {
      const started = performance.now();
      await act();
      show();
      const wait = Number($("speed").value) - (performance.now() - started);
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    }
  } finally {
    running = false;
    $("run").textContent = "Run";
    show();
  }
}

async function main() {
  info = await api.start();
  const names = cartpolePolicies(info);
  if (!names.length) throw new Error("this service serves no CartPole-v1 policy (see /info)");
  for (const name of names) $("model").append(el("option", { value: name, text: name }));
  $("model").onchange = () => { showCard(); reset(); };
  $("reset").onclick = guarded(async () => reset());
  $("step").onclick = guarded(step);
  $("run").onclick = guarded(run);
  $("push-left").onclick = () => { env.push(-1); show(); };
  $("push-right").onclick = () => { env.push(1); show(); };
  showCard();
  reset();
}

guarded(main)();
