"""The camera contract of pixel policies, shared by training, the client and the service.

A pixel policy sees what a camera sees, not the state: each frame the environment renders
(gymnasium's `render_mode="rgb_array"`, CartPole-v1: 400x600 RGB) becomes one small greyscale
picture, and the policy gets the last FRAMES of them, oldest first, so that it can tell speed
from the change between them.

    frame = camera_frame(rgb)          # uint8 [32, 120]
    stack = FrameStack(4)
    observation = stack.reset(frame)   # uint8 [4, 32, 120]: the first frame four times
    observation = stack.push(frame)    # the newest last

camera_frame, step by step (a client in any language can do the same):
  1. crop rows CROP_ROWS (160 to 319) of the frame: the band the cart and pole move in;
  2. greyscale Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), in float32;
  3. shrink by BLOCK (5) in both directions: the mean of each 5x5 block (160x600 -> 32x120);
  4. round to the nearest integer (half to even) as uint8.
"""

from __future__ import annotations

from collections import deque

import numpy as np

CROP_ROWS = (160, 320)                 # [first, end) rows of the 400x600 frame
BLOCK = 5                              # 5x5 pixel blocks averaged into one
FRAME_SHAPE = (32, 120)                # (CROP_ROWS span / BLOCK, 600 / BLOCK)
FRAMES = 4                             # stacked frames per observation, oldest first
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def camera_frame(rgb: np.ndarray) -> np.ndarray:
    """One rendered RGB frame [400, 600, 3] uint8 -> the policy's greyscale frame [32, 120] uint8."""
    band = np.asarray(rgb)[CROP_ROWS[0]:CROP_ROWS[1]].astype(np.float32)
    grey = band @ LUMA
    h, w = grey.shape[0] // BLOCK, grey.shape[1] // BLOCK
    small = grey[:h * BLOCK, :w * BLOCK].reshape(h, BLOCK, w, BLOCK).mean(axis=(1, 3))
    return np.rint(small).clip(0, 255).astype(np.uint8)


class FrameStack:
    """The last `frames` camera frames, oldest first."""

    def __init__(self, frames: int = FRAMES):
        self.frames = deque(maxlen=frames)

    def reset(self, frame: np.ndarray) -> np.ndarray:
        self.frames.extend([frame] * self.frames.maxlen)
        return self.observation()

    def push(self, frame: np.ndarray) -> np.ndarray:
        self.frames.append(frame)
        return self.observation()

    def observation(self) -> np.ndarray:
        return np.stack(self.frames)
