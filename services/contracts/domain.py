"""Is an image like what the classifier learnt from? A score from its embedding (numpy only:
training/domain.py fits and calibrates it, the classifier service answers with it).

    check = DomainCheck.from_bytes(version_dir / card["contract"]["domain"]["file"])
    scores = check.scores(embeddings)     # [N] in [0, 1], higher = more typical
    in_domain = scores >= card["contract"]["domain"]["threshold"]

Two measures of the embedding, each read against held-out training images (never trained on):
- distance: Mahalanobis to the nearest class mean, one covariance shared by the classes (Lee et
  al., 2018): far from every class is unusual;
- head: a linear outlier-exposure head (Hendrycks et al., 2019), trained to tell the training
  images from crops of real photos: a photo of a cat lies near the "Bag" class, but not on the
  side the clothing lies.
A measure's score is the share of held-out training images at least as unusual by it; the
domain score is the lower of the two. 0.5 is a typical training image, 0.01 means only 1% of
held-out images are as unusual. Softmax cannot say this: label smoothing caps the confidence of
in-domain images near 0.9, and scikit-image's cat gets 0.87 for "Bag".
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

BLOCK = 320  # columns of the factor per matrix product (see _times_factor)
SCORE = ("the lower of two shares of held-out training images at least as unusual as this image: by Mahalanobis "
         "distance of the embedding to the nearest class mean, and by the outlier-exposure head; 0.5 is typical, "
         "0 is more unusual than all of them")


@dataclass(frozen=True)
class DomainCheck:
    factor: np.ndarray              # [D, D] float32: Cholesky factor of the inverse shared covariance
    means: np.ndarray               # [C, D] float32: class means times factor
    head_weights: np.ndarray        # [D] float32: the head's logit is embedding @ weights + bias
    head_bias: float
    reference_distances: np.ndarray  # [M] sorted: squared distances of the held-out images
    reference_heads: np.ndarray      # [M] sorted: head logits of the held-out images

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row to its nearest class mean."""
        p = self._times_factor(np.asarray(embeddings, np.float32))
        squared = (p * p).sum(1)[:, None] - 2 * (p @ self.means.T) + (self.means * self.means).sum(1)[None]
        return np.maximum(squared.min(1).astype(np.float64), 0.0)

    def _times_factor(self, x: np.ndarray) -> np.ndarray:
        """x @ factor, skipping the zeros above its diagonal: the factor is lower triangular, so
        column block [j0:j1] only needs rows j0 onwards (8 blocks: 44% fewer multiplications;
        this is most of a /classify request's cost of the check)."""
        d = self.factor.shape[0]
        out = np.empty((len(x), d), np.float32)
        for j0 in range(0, d, BLOCK):
            j1 = min(d, j0 + BLOCK)
            out[:, j0:j1] = x[:, j0:] @ self.factor[j0:, j0:j1]
        return out

    def heads(self, embeddings: np.ndarray) -> np.ndarray:
        """The head's logit: higher = more like the training images."""
        return (np.asarray(embeddings, np.float32) @ self.head_weights).astype(np.float64) + self.head_bias

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        far = self.reference_distances
        by_distance = (len(far) - np.searchsorted(far, self.distances(embeddings), side="left")) / len(far)
        by_head = np.searchsorted(self.reference_heads, self.heads(embeddings), side="right") / len(self.reference_heads)
        return np.minimum(by_distance, by_head)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, factor=self.factor, means=self.means, head_weights=self.head_weights,
                 head_bias=np.float64(self.head_bias), reference_distances=self.reference_distances,
                 reference_heads=self.reference_heads)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DomainCheck":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("factor", "means", "head_weights", "head_bias", "reference_distances",
                                        "reference_heads")}
        d = arrays["factor"].shape[0]
        shapes = {k: a.shape for k, a in arrays.items()}
        if (shapes["factor"] != (d, d) or len(shapes["means"]) != 2 or shapes["means"][1] != d
                or shapes["head_weights"] != (d,) or shapes["head_bias"] != ()
                or len(shapes["reference_distances"]) != 1 or shapes["reference_distances"] != shapes["reference_heads"]
                or not shapes["reference_heads"][0]):
            raise ValueError(f"domain statistics of unexpected shapes: {shapes}")
        return cls(arrays["factor"].astype(np.float32), arrays["means"].astype(np.float32),
                   arrays["head_weights"].astype(np.float32), float(arrays["head_bias"]),
                   np.sort(arrays["reference_distances"].astype(np.float64)),
                   np.sort(arrays["reference_heads"].astype(np.float64)))
