// CartPole-v1 as gymnasium defines it (gymnasium/envs/classic_control/cartpole.py): the same
// constants, Euler integration, termination and 500-step limit, so the served policy sees the
// observations it was trained on. Reset draws each state variable from U(-0.05, 0.05) with a
// seeded generator (not numpy's: the same seed gives the same episode here, not in gymnasium).
"use strict";

class CartPole {
  static GRAVITY = 9.8;
  static MASS_CART = 1.0;
  static MASS_POLE = 0.1;
  static TOTAL_MASS = 1.1;
  static HALF_LENGTH = 0.5;          // gymnasium's "length": half the pole
  static POLE_MASS_LENGTH = 0.05;    // MASS_POLE * HALF_LENGTH
  static FORCE = 10.0;
  static TAU = 0.02;                 // seconds per step
  static THETA_LIMIT = 12 * 2 * Math.PI / 360;
  static X_LIMIT = 2.4;
  static MAX_STEPS = 500;

  reset(seed) {
    const random = mulberry32(seed);
    this.state = [0, 0, 0, 0].map(() => random() * 0.1 - 0.05);  // x, x_dot, theta, theta_dot
    this.steps = 0;
    this.total = 0;
    this.terminated = false;
    this.truncated = false;
    return this.observation();
  }

  observation() {
    return this.state.map(Math.fround);  // gymnasium returns float32
  }

  get done() {
    return this.terminated || this.truncated;
  }

  step(action) {
    const C = CartPole;
    let [x, xDot, theta, thetaDot] = this.state;
    const force = action === 1 ? C.FORCE : -C.FORCE;
    const cos = Math.cos(theta), sin = Math.sin(theta);
    const temp = (force + C.POLE_MASS_LENGTH * thetaDot * thetaDot * sin) / C.TOTAL_MASS;
    const thetaAcc = (C.GRAVITY * sin - cos * temp) /
      (C.HALF_LENGTH * (4.0 / 3.0 - C.MASS_POLE * cos * cos / C.TOTAL_MASS));
    const xAcc = temp - C.POLE_MASS_LENGTH * thetaAcc * cos / C.TOTAL_MASS;
    x += C.TAU * xDot;
    xDot += C.TAU * xAcc;
    theta += C.TAU * thetaDot;
    thetaDot += C.TAU * thetaAcc;
    this.state = [x, xDot, theta, thetaDot];
    this.steps += 1;
    this.total += 1;  // +1 for every step taken, the last (terminating) one included
    this.terminated = x < -C.X_LIMIT || x > C.X_LIMIT || theta < -C.THETA_LIMIT || theta > C.THETA_LIMIT;
    this.truncated = !this.terminated && this.steps >= C.MAX_STEPS;
    return this.observation();
  }

  // A disturbance: the pole is knocked sideways (its angular velocity jumps).
  push(direction) {
    this.state[3] += 0.4 * direction;  // rad/s: the shipped policy recovers from it (a test checks)
  }
}

function mulberry32(seed) {
  let a = (seed >>> 0) + 0x6d2b79f5;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function drawCartPole(canvas, env, lastAction) {
  const g = canvas.getContext("2d");
  const width = canvas.width, height = canvas.height;
  const scale = width / (2 * CartPole.X_LIMIT * 1.2);
  const track = height * 0.72;
  const [x, , theta] = env.state;
  g.clearRect(0, 0, width, height);
  g.strokeStyle = "#9aa5b1";
  g.lineWidth = 2;
  g.beginPath();
  g.moveTo(0, track);
  g.lineTo(width, track);
  g.stroke();
  for (const edge of [-CartPole.X_LIMIT, CartPole.X_LIMIT]) {  // where the episode ends
    const ex = width / 2 + edge * scale;
    g.strokeStyle = "#e0a3a3";
    g.beginPath();
    g.moveTo(ex, track - 40);
    g.lineTo(ex, track + 10);
    g.stroke();
  }
  const cx = width / 2 + x * scale;
  g.fillStyle = env.terminated ? "#b42318" : "#1d2330";
  g.fillRect(cx - 30, track - 16, 60, 30);
  const pole = 2 * CartPole.HALF_LENGTH * scale;
  g.strokeStyle = "#c98a2b";
  g.lineWidth = 10;
  g.lineCap = "round";
  g.beginPath();
  g.moveTo(cx, track - 16);
  g.lineTo(cx + pole * Math.sin(theta), track - 16 - pole * Math.cos(theta));
  g.stroke();
  g.fillStyle = "#5f6b7a";
  g.beginPath();
  g.arc(cx, track - 16, 5, 0, 2 * Math.PI);
  g.fill();
  if (lastAction !== null && lastAction !== undefined) {  // the push the policy chose
    g.fillStyle = "#2b6cb0";
    g.font = "20px system-ui";
    g.fillText(lastAction === 1 ? "⟶" : "⟵", cx + (lastAction === 1 ? 36 : -58), track + 6);
  }
}
