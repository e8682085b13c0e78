// Run face-api's own FaceLandmark68Net (@vladmandic/face-api 1.7.15, tfjs 4.22 CPU backend, pure JS)
// and write its outputs, as the reference for training/faces/landmarks.py.
//
//   node training/faces/js/landmarks_reference.mjs IN.json OUT.json
//
// (training/faces/record_landmarks_reference.py writes IN.json, runs this and reads OUT.json.)
// Needs a node workspace with @vladmandic/face-api and @tensorflow/tfjs installed, and the face-api package
// (for model/): set FACE_API_NODE (default: this folder, after `npm install --prefix training/faces/js`) and FACE_API (default
// data/face-api/1.7.15/package, where `python -m training faces` unpacks it). Node >= 20.6 (module.register).
//
// IN.json:  {"inputs": [[112*112*3 numbers, HWC RGB 0..255], ...],      the net's input, already 112x112
//            "crops":  [{"height": h, "width": w, "data": [h*w*3 ints, HWC RGB]}, ...]}   optional
// OUT.json: {"landmarks": [[136 numbers], ...]}   raw net output x0, y0, x1, ... relative to the 112 input
//           and for each crop, face-api's own pad + resize and point mapping:
//           {"crop_inputs": [[112*112*3]], "crop_points": [[x0, y0, x1, ...]] in crop pixels}
import { readFileSync, writeFileSync } from 'node:fs';
import { register } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const NODE = process.env.FACE_API_NODE || new URL('.', import.meta.url).pathname;
const FACE_API = process.env.FACE_API || new URL('../../../data/face-api/1.7.15/package', import.meta.url).pathname;
const [inPath, outPath] = process.argv.slice(2);

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

// Load the weights the way tfjs does (decodeWeights dequantises), then hand face-api the weight map.
const manifestPath = join(FACE_API, 'model/face_landmark_68_model-weights_manifest.json');
const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
const specs = manifest.flatMap((group) => group.weights);
const bytes = Buffer.concat(manifest.flatMap((group) => group.paths.map((p) => readFileSync(join(FACE_API, 'model', p)))));
const weightMap = tf.io.decodeWeights(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), specs);
const net = new faceapi.FaceLandmark68Net();
net.loadFromWeightMap(weightMap);

const request = JSON.parse(readFileSync(inPath, 'utf8'));
const out = { landmarks: [], crop_inputs: [], crop_points: [] };

for (const input of request.inputs) {
  const image = tf.tensor3d(input, [112, 112, 3], 'float32');
  // runNet on a NetInput = feature extractor (normalise, 4 dense blocks, avg pool) + fc, before postProcess.
  const raw = net.runNet(await faceapi.toNetInput(image));
  out.landmarks.push(Array.from(await raw.data()));
  tf.dispose([image, raw]);
}

for (const { height, width, data } of request.crops || []) {
  // An int32 image tensor, like tf.node.decodeImage gives and extractFaceTensors slices.
  const face = tf.tensor3d(data, [height, width, 3], 'int32');
  const netInput = await faceapi.toNetInput(face);
  const batch = netInput.toBatchTensor(112, true);
  out.crop_inputs.push(Array.from(await batch.data()));
  const landmarks = await net.detectLandmarks(face); // positions in crop pixels
  out.crop_points.push(landmarks.positions.flatMap((p) => [p.x, p.y]));
  tf.dispose([face, batch]);
}

writeFileSync(outPath, JSON.stringify(out));
