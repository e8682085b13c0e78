// Run face-api's own FaceLandmark68Net (@vladmandic/face-api 1.7.15, tfjs 4.22 CPU backend, pure JS)
// and write its outputs, as the reference for training/faces/landmarks.py.
//
//   node training/faces/js/landmarks_reference.mjs IN.json OUT.json
//
// (training/faces/record_landmarks_reference.py writes IN.json, runs this and reads OUT.json.)
// Where node finds face-api and its weights: face_api.mjs (FACE_API_NODE, FACE_API).
//
// IN.json:  {"inputs": [[112*112*3 numbers, HWC RGB 0..255], ...],      the net's input, already 112x112
//            "crops":  [{"height": h, "width": w, "data": [h*w*3 ints, HWC RGB]}, ...]}   optional
// OUT.json: {"landmarks": [[136 numbers], ...]}   raw net output x0, y0, x1, ... relative to the 112 input
//           and for each crop, face-api's own pad + resize and point mapping:
//           {"crop_inputs": [[112*112*3]], "crop_points": [[x0, y0, x1, ...]] in crop pixels}
import { readFileSync, writeFileSync } from 'node:fs';

import { loadFaceApi, loadNet } from './face_api.mjs';

const [inPath, outPath] = process.argv.slice(2);

const { faceapi, tf } = await loadFaceApi();
const net = loadNet(tf, new faceapi.FaceLandmark68Net(), 'face_landmark_68_model');

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
