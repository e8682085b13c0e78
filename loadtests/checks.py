"""Answer checks of the Locust files, kept free of locust so tests can import them
(importing locust monkey-patches the whole process with gevent)."""

from __future__ import annotations

import base64

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_policy(response, rollout: dict, start: int, size: int) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    body = response.json()
    actions = body.get("actions")
    if not isinstance(actions, list) or len(actions) != size:
        return f"expected {size} actions, got {actions!r:.200}"
    probabilities = body.get("probabilities")
    if probabilities is not None and any(abs(sum(p) - 1) > 1e-4 for p in probabilities):
        return "probabilities do not sum to 1"
    if body.get("version") == rollout["version"] and actions != rollout["actions"][start:start + size]:
        return "actions differ from the recorded deterministic actions of this version"
    return None


def check_generate(response, n: int, seed: int, size: tuple[int, int]) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    body = response.json()
    images, seeds = body.get("images", []), body.get("seeds", [])
    if len(images) != n or seeds[:1] != [seed]:
        return f"expected {n} images starting at seed {seed}, got {len(images)} with seeds {seeds[:2]}"
    for image in images:
        png = base64.b64decode(image)
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        if not png.startswith(PNG_SIGNATURE) or (width, height) != size:
            return f"not a {size[0]}x{size[1]} PNG"
    return None
