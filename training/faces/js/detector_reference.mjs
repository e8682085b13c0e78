// Run face-api's own SsdMobilenetv1 face detector (@vladmandic/face-api 1.7.15, tfjs 4.22 CPU backend,
// pure JS) and write its outputs, as the reference for training/faces/detector.py.
//
//   node training/faces/js/detector_reference.mjs IN.json OUT.json
//
// (training/faces/record_detector_reference.py writes IN.json and the raw files, runs this, reads OUT.json.)
// Where node finds face-api and its weights: face_api.mjs (FACE_API_NODE, FACE_API).
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

import { loadFaceApi, loadNet } from './face_api.mjs';

const [inPath, outPath] = process.argv.slice(2);

const { faceapi, tf } = await loadFaceApi();
const net = loadNet(tf, faceapi.nets.ssdMobilenetv1, 'ssd_mobilenetv1_model');  // the instance detectAllFaces uses

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
