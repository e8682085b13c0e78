// Run face-api's own FaceRecognitionNet (@vladmandic/face-api 1.7.15, tfjs 4.22 CPU backend, pure JS)
// on aligned 150x150 face chips and write its descriptors, as the reference for training/faces/descriptor.py.
//
//   node training/faces/js/descriptor_reference.mjs CHIPS.npy OUT.npy      (from /work/main, any cwd works)
//
// (training/faces/record_descriptor_reference.py writes CHIPS.npy, runs this and reads OUT.npy.)
// Where node finds face-api and its weights: face_api.mjs (FACE_API_NODE, FACE_API).
//
// CHIPS.npy: [K, 150, 150, 3] uint8 or float32 (little-endian, C order), RGB 0..255; or a headerless raw
//            float32 file of K*150*150*3 values in that layout (any other extension).
// OUT.npy:   [K, 128] float32 descriptors (computeFaceDescriptor of each chip, as a batch of one).
import { readFileSync, writeFileSync } from 'node:fs';

import { loadFaceApi, loadNet } from './face_api.mjs';

const [inPath, outPath] = process.argv.slice(2);
const SIZE = 150;

const { faceapi, tf } = await loadFaceApi();
const net = loadNet(tf, new faceapi.FaceRecognitionNet(), 'face_recognition_model');

// Minimal .npy reader: version 1/2 header, '<f4' or '|u1', C order. Returns a Float32Array.
const asFloat32 = (b) => new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
function readChips(path) {
  const buf = readFileSync(path);
  if (!path.endsWith('.npy')) return asFloat32(buf);
  const start = buf[6] === 1 ? 10 + buf.readUInt16LE(8) : 12 + buf.readUInt32LE(8);
  const header = buf.toString('latin1', buf[6] === 1 ? 10 : 12, start);
  if (/'fortran_order': True/.test(header)) throw new Error(`${path}: fortran order`);
  if (/'descr': '\|u1'/.test(header)) return Float32Array.from(buf.subarray(start));
  if (/'descr': '<f4'/.test(header)) return asFloat32(buf.subarray(start));
  throw new Error(`${path}: need uint8 or little-endian float32, got ${header}`);
}

function writeNpy(path, values, shape) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')}), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n'; // pad so the data starts 64-byte aligned
  const head = Buffer.alloc(10);
  head.write('\x93NUMPY', 0, 'latin1');
  head[6] = 1;
  head.writeUInt16LE(header.length, 8);
  writeFileSync(path, Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(values.buffer)]));
}

const chips = readChips(inPath);
const count = chips.length / (SIZE * SIZE * 3);
if (!Number.isInteger(count)) throw new Error(`${inPath}: ${chips.length} values is not a whole number of chips`);
const out = new Float32Array(count * 128);
for (let i = 0; i < count; i++) {
  // A float32 [150, 150, 3] tensor: toBatchTensor(150) neither pads nor resizes it.
  const chip = tf.tensor3d(chips.subarray(i * SIZE * SIZE * 3, (i + 1) * SIZE * SIZE * 3), [SIZE, SIZE, 3], 'float32');
  out.set(await net.computeFaceDescriptor(chip), i * 128);
  chip.dispose();
}
writeNpy(outPath, out, [count, 128]);
