"""Each classifier version's out-of-domain check (its card's `contract.domain`), read once.

    answer = domains.answer(model, embeddings)   # {"in_domain": [True, False], "domain_score": [0.41, 0.0]}

The repository checked the file against its sha256 when the version loaded; it is read here
on first use and kept per model file. A classifier without one answers null for both.
DOMAIN_THRESHOLD overrides every card's threshold (0 flags nothing, 1 flags everything).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from services.contracts.domain import DomainCheck
from services.runtime import ApiError


class Domains:
    def __init__(self, override: float | None = None):  # DOMAIN_THRESHOLD; None: each card's threshold
        self._checks: dict[str, DomainCheck] = {}  # by the model file's sha256
        self._lock = threading.Lock()
        self.override = override

    def threshold(self, model) -> float | None:
        spec = getattr(model.spec.contract, "domain", None)  # classifiers only
        if not spec:
            return None
        return spec.threshold if self.override is None else self.override

    def check(self, model) -> DomainCheck | None:
        spec = getattr(model.spec.contract, "domain", None)  # classifiers only
        if not spec:
            return None
        sha = model.spec.sha256
        if sha not in self._checks:
            with self._lock:
                if sha not in self._checks:
                    self._checks[sha] = self._read(model, spec)
        return self._checks[sha]

    @staticmethod
    def _read(model, spec: dict) -> DomainCheck:
        path = model.entry.path.parent / spec.file
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != spec.sha256:
                raise ValueError("its sha256 no longer matches the card")
            return DomainCheck.from_bytes(data)
        except (OSError, ValueError, KeyError) as exc:
            raise ApiError(503, "domain_unavailable", f"{model.name} version {model.version}: the out-of-domain "
                           f"statistics {path.name} cannot be read: {exc}") from None

    def answer(self, model, embeddings: np.ndarray | None) -> dict:
        """One in_domain and one domain_score per embedding row, with the threshold (null where the
        model has no statistics, or no embedding)."""
        check = self.check(model) if embeddings is not None else None
        if check is None:
            return {"in_domain": None, "domain_score": None, "domain_threshold": None}
        scores, threshold = check.scores(embeddings), self.threshold(model)
        return {"in_domain": [bool(s >= threshold) for s in scores], "domain_score": [round(float(s), 4) for s in scores],
                "domain_threshold": threshold}
