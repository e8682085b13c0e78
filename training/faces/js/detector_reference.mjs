// Run face-api's own SsdMobilenetv1 face detector (@vladmandic/face-api 1.7.15, tfjs 4.22 CPU backend,
// pure JS) and write its outputs, as the reference for training/faces/detector.py.
//
//   node training/faces/js/detector_reference.mjs IN.json OUT.json
//
// (training/faces/record_detector_reference.py writes IN.json and the raw files, runs this, reads OUT.json.)
// Needs a node workspace with @vladmandic/face-api and @tensorflow/tfjs installed, and the face-api package
// (for model/): set FACE_API_NODE (default: this folder, after `npm install --prefix training/faces/js`) and FACE_API (default
// data/face-api/1.7.15/package, where `python -m training faces` unpacks it). Node >= 20.6 (module.register).
//
// IN.json:  {"inputs": [PATH, ...],    raw float32 [512, 512, 3] HWC RGB 0..255: the net's input, already
//                                      padded + resized (detector.prepare)
//            "photos": [{"path": PATH, "height": h, "width": w}, ...]}   raw uint8 [h, w, 3] HWC RGB photos
// OUT.json: {"boxes": [[5118 * 4]], "scores": [[5118]]}   per input, the net + output layer before NMS;
//           boxes as face-api has them: (ymin, xmin, ymax, xmax) relative to the 512 square
//           {"detections": [[{x, y, width, height, score}, ...]]}   per photo, faceapi.detectAllFaces(photo)
//           at its defaults (SsdMobilenetv1Options: minConfidence 0.5, maxResults 100), in photo pixels
//           and for each photo, PATH + ".batch.f32": face-api's own pad + resize (toBatchTensor(512, false)),
//           raw float32 [512, 512, 3]
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
const manifestPath = join(FACE_API, 'model/ssd_mobilenetv1_model-weights_manifest.json');
const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
const specs = manifest.flatMap((group) => group.weights);
const bytes = Buffer.concat(manifest.flatMap((group) => group.paths.map((p) => readFileSync(join(FACE_API, 'model', p)))));
const weightMap = tf.io.decodeWeights(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), specs);
const net = faceapi.nets.ssdMobilenetv1; // the instance detectAllFaces uses
net.loadFromWeightMap(weightMap);

const request = JSON.parse(readFileSync(inPath, 'utf8'));
const out = { boxes: [], scores: [], detections: [] };
const rawBytes = (path) => { const b = readFileSync(path); return b.buffer.slice(b.byteOffset, b.byteOffset + b.length); };

for (const path of request.inputs) {
  const image = tf.tensor3d(new Float32Array(rawBytes(path)), [512, 512, 3], 'float32');
  // forward = normalise, MobileNetV1, prediction layer, output layer (anchor decoding + sigmoid); no NMS.
  const { boxes, scores } = await net.forward(image);
  out.boxes.push(Array.from(await boxes[0].data()));
  out.scores.push(Array.from(await scores[0].data()));
  tf.dispose([image, boxes, scores]);
}

for (const { path, height, width } of request.photos) {
  // An int32 image tensor, like tf.node.decodeImage gives.
  const photo = tf.tensor3d(new Int32Array(new Uint8Array(rawBytes(path))), [height, width, 3], 'int32');
  const batch = (await faceapi.toNetInput(photo)).toBatchTensor(512, false);
  writeFileSync(`${path}.batch.f32`, Buffer.from((await batch.data()).buffer));
  const detections = await faceapi.detectAllFaces(photo);
  out.detections.push(detections.map(({ box, score }) => ({ x: box.x, y: box.y, width: box.width, height: box.height, score })));
  tf.dispose([photo, batch]);
}

writeFileSync(outPath, JSON.stringify(out));
