// face-api's own networks in node, on tfjs's pure-JS CPU backend: what the reference scripts share.
//
//   const { faceapi, tf } = await loadFaceApi();
//   const net = await loadNet(faceapi, tf, new faceapi.FaceRecognitionNet(), 'face_recognition_model');
//
// Needs a node workspace with @vladmandic/face-api and @tensorflow/tfjs (FACE_API_NODE, default: this
// folder after `npm install --prefix training/faces/js`) and the unpacked package for its model/
// folder (FACE_API, default data/face-api/1.7.15/package, where `python -m training faces` unpacks it).
// Node >= 20.6 (module.register).
import { readFileSync } from 'node:fs';
import { register } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const NODE = process.env.FACE_API_NODE || new URL('.', import.meta.url).pathname;
const FACE_API = process.env.FACE_API || new URL('../../../data/face-api/1.7.15/package', import.meta.url).pathname;

export async function loadFaceApi() {
  // face-api's esm-nobundle build imports tfjs' ESM sources (extensionless imports node cannot resolve)
  // and the wasm/webgl backends (absent or useless here): send tfjs to its CommonJS build, stub the backends.
  register('data:text/javascript,' + encodeURIComponent(`
export async function resolve(spec, ctx, next) {
  if (spec.startsWith('@tensorflow/tfjs-backend-wasm') || spec.startsWith('@tensorflow/tfjs-backend-webgl')) {
    return { url: 'data:text/javascript,export {}', shortCircuit: true };
  }
  if (spec === '@tensorflow/tfjs/dist/index.js') return next('@tensorflow/tfjs', ctx);
  return next(spec, ctx);
}`));
  const faceapi = await import(pathToFileURL(join(NODE, 'node_modules/@vladmandic/face-api/dist/face-api.esm-nobundle.js')));
  const { tf } = faceapi;
  await tf.setBackend('cpu');
  await tf.ready();
  return { faceapi, tf };
}

// Load a network's weights the way tfjs does (decodeWeights dequantises), then hand face-api the weight map.
export function loadNet(tf, net, name) {
  const manifest = JSON.parse(readFileSync(join(FACE_API, `model/${name}-weights_manifest.json`), 'utf8'));
  const specs = manifest.flatMap((group) => group.weights);
  const bytes = Buffer.concat(manifest.flatMap((group) => group.paths.map((p) => readFileSync(join(FACE_API, 'model', p)))));
  net.loadFromWeightMap(tf.io.decodeWeights(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), specs));
  return net;
}
