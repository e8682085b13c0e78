"""The classifier's taught state: the store of taught examples (store.py) and its search
(matching.py), opened in the background once the models are loaded, and the readiness it gives.

    taught = TaughtState(runtime, settings, domains, check_name)
    taught.open(wait=False)                   # a thread; taught.failure says why it is not open
    store = taught.require()                  # 503 state_unavailable until it is
    count = await taught.call(store.add, examples, limit)   # off the loop; store errors as HTTP answers
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from services.classifier import state as taught_state
from services.classifier.matching import Matcher
from services.classifier.store import StoreError, TooManyExamples, open_store
from services.runtime import ApiError, tracing
from services.runtime.config import ClassifierSettings
from services.runtime.metrics import metrics

TEACHABLE = ("classifier", "face_descriptor")  # kinds whose output can be taught
log = logging.getLogger("services.classifier")


def embedding_dim(model) -> int:
    output = next(o for o in model.spec.contract.outputs if o.name in ("embedding", "descriptor"))
    return int(output.shape[1])


def is_faces(model) -> bool:
    return model.spec.kind == "face_descriptor"


def teachable(runtime) -> list:
    """The serving version of each model that can be taught."""
    return [m for m in runtime.models.values() if m.spec.kind in TEACHABLE]


def loaded_versions(runtime, kinds: tuple[str, ...]) -> list:
    """Every loaded version of those kinds (each teachable one keeps its own taught examples)."""
    return [m for versions in runtime.versions.values() for m in versions.values() if m.spec.kind in kinds]


def dims(runtime) -> dict[str, int]:
    return {m.spec.sha256: embedding_dim(m) for m in loaded_versions(runtime, TEACHABLE)}


class TaughtState:
    def __init__(self, runtime, settings: ClassifierSettings, domains, check_name):
        self.runtime, self.domains, self.check_name = runtime, domains, check_name
        self.url, self.pgvector, self.legacy_state = settings.teach_store, settings.teach_pgvector, \
            settings.teach_state_path
        self.max_examples = settings.taught_examples
        self.store = self.matcher = None
        self.failure: str | None = "the taught-examples store is opening"
        self.first_attempt = threading.Event()  # set once the store was tried: opened, or said why not
        self.up = metrics()["store_up"].labels("classifier")
        self.up.set(0)

    def open(self, wait: bool) -> None:
        threading.Thread(target=self._open, name="classifier-store", daemon=True).start()
        if wait:
            self.first_attempt.wait()

    def close(self) -> None:
        """A graceful stop closes the store: SQLite then folds its -wal file back into the
        database and removes it, PostgreSQL sees its connection end."""
        if self.store is not None:
            self.store.close()

    def _open(self) -> None:
        """Open the store once the models are loaded (imported embeddings are checked against
        them), import a legacy taught.json once, then serve. An unreachable database is tried
        again every 2 s (PostgreSQL may start after us); a legacy file that cannot be read
        keeps the service not ready, and the file is left as it is."""
        try:
            if self.runtime.wait():
                for model in loaded_versions(self.runtime, ("classifier",)):
                    self.domains.check(model)
            self._connect()
        except ApiError as exc:
            self._not_ready(exc.message)
        finally:
            self.first_attempt.set()

    def _connect(self) -> None:
        if not self.runtime.wait():
            return
        said = None
        while True:
            try:
                store = open_store(self.url, self.pgvector)
                break
            except (StoreError, ValueError, OSError, ImportError) as exc:
                why = f"taught-examples store {self.redacted_url()} cannot be opened: {exc}"
                if why != said:
                    self._not_ready(why + " (retrying every 2 s)")
                    said = why
                self.first_attempt.set()
                if isinstance(exc, ValueError):
                    return  # a wrong TEACH_STORE: retrying will not help
                time.sleep(2)
        try:
            self._import_legacy(store)
        except (StoreError, ValueError, OSError, TooManyExamples) as exc:
            return self._not_ready(f"taught state {self.legacy_state} cannot be read: {exc}")
        try:
            matcher = Matcher(store)
            for model in loaded_versions(self.runtime, TEACHABLE):  # each model's cache or index, before ready
                matcher.prepare(model.spec.sha256, embedding_dim(model))
        except (StoreError, ApiError) as exc:
            return self._not_ready(f"taught examples cannot be prepared for search: {getattr(exc, 'message', exc)}")
        self.matcher, self.store, self.failure = matcher, store, None
        self.up.set(1)
        log.info("classifier: taught examples in %s (%s)", self.redacted_url(), store.describe()["search"])

    def _not_ready(self, why: str) -> None:
        self.failure = why
        self.up.set(0)
        log.error("classifier: NOT READY - %s", why)

    def _import_legacy(self, store) -> None:
        if not self.legacy_state.exists():
            return
        examples = taught_state.read_legacy(self.legacy_state, dims(self.runtime), self.check_name)
        added = store.import_once(f"imported {self.legacy_state.resolve()}", examples, self.max_examples)
        if added is not None:
            log.info("classifier: imported %d of %d examples from %s (the file is kept; delete it when you like)",
                     added, len(examples), self.legacy_state)

    def redacted_url(self) -> str:
        """The store's URL without its password, for logs and /info."""
        scheme, sep, rest = self.url.partition("://")
        credentials, at, host = rest.rpartition("@")
        user, colon, _ = credentials.partition(":")
        return f"{scheme}{sep}{user}{':***' if colon else ''}{at}{host}"

    def require(self):
        if self.store is None:
            raise ApiError(503, "state_unavailable", self.failure or "the store is opening")
        return self.store

    async def nearest(self, model_sha256: str, queries, k: int):
        """The k nearest taught examples of each query (matching.py), off the loop."""
        return await self.call(self.matcher.nearest, model_sha256, queries, k)

    async def call(self, method, *args, **kwargs):
        """Run a blocking store call in a worker thread; store problems become HTTP answers."""
        try:
            operation = getattr(method, "__name__", "call")
            started = time.perf_counter()
            with tracing.span(f"store.{operation}", **{"db.system": self.url.partition(":")[0]}):
                answer = await asyncio.to_thread(method, *args, **kwargs)
            metrics()["store_seconds"].labels("classifier", operation).observe(time.perf_counter() - started)
            self.up.set(1)
            return answer
        except StoreError as exc:
            self.up.set(0)
            raise ApiError(503, "store_unavailable", str(exc)) from None
        except TooManyExamples as exc:
            raise ApiError(409, "too_many_examples", f"the taught state would hold {exc.total} examples, over the "
                           f"limit of {exc.limit} (MAX_TAUGHT_EXAMPLES); forget some first", "state") from None
