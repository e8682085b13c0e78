"""Locust load test of the face pipeline: teach people from one photo, recognise them in others.

    python -m loadtests.run faces --users 8 --duration 60s

Photos: tests/fixtures/faces (three of one person, one of another, two group photos). Each user
teaches both people under its own names once, then mostly checks photos, sometimes detects and
re-teaches. Every answer is checked: the right name matched on each photo of a taught person,
no match for the strangers of the group photos, three faces found in each group photo.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from locust import tag, task

from loadtests.run import service_url
from loadtests.users import ServiceUser

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "faces"
PEOPLE = {"obama.jpg": "obama", "obama2.jpg": "obama", "obama3.jpg": "obama", "biden.jpg": "biden"}
GROUPS = ["group_1.jpg", "group_2.jpg"]
DATA = {name: (PHOTOS / name).read_bytes() for name in [*PEOPLE, *GROUPS]}


def upload(name: str):
    return [("images", (name, DATA[name], "image/jpeg"))]


class FacesUser(ServiceUser):
    host = service_url("classifier")

    def on_start(self):
        super().on_start()
        self.names = {person: f"{person}-{uuid.uuid4().hex[:8]}" for person in ("obama", "biden")}
        for photo, person in (("obama.jpg", "obama"), ("biden.jpg", "biden")):
            self.client.post("/teach", files=upload(photo), data={"name": self.names[person]}, name="/teach (start)")

    def on_stop(self):
        for name in self.names.values():
            self.client.post("/forget", json={"name": name}, name="/forget")

    @tag("faces", "check")
    @task(6)
    def check(self):
        photo = random.choice([*PEOPLE, *GROUPS])
        with self.client.post("/check", files=upload(photo), name="/check (faces)", catch_response=True) as response:
            if response.status_code != 200:
                return response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            faces = response.json()["results"][0]["faces"]
            if photo in GROUPS:
                if len(faces) != 3 or any(f["matched"] for f in faces):
                    return response.failure(f"{photo}: expected 3 unmatched strangers, got {faces}")
            else:
                # another user may have taught the same person under its own name: any of ours
                # or theirs is right, as long as it is that person
                best = faces[0]
                if not best["matched"] or not best["name"].startswith(PEOPLE[photo] + "-"):
                    return response.failure(f"{photo}: expected {PEOPLE[photo]}, got {best}")
            response.success()

    @tag("faces", "detect")
    @task(2)
    def detect(self):
        with self.client.post("/faces/detect", files=upload(random.choice(GROUPS)), name="/faces/detect",
                              catch_response=True) as response:
            if response.status_code != 200 or len(response.json()["faces"][0]) != 3:
                return response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            response.success()

    @tag("faces", "teach")
    @task(1)
    def teach(self):
        photo = random.choice(list(PEOPLE))
        with self.client.post("/teach", files=upload(photo), data={"name": self.names[PEOPLE[photo]]},
                              name="/teach (faces)", catch_response=True) as response:
            if response.status_code != 200 or len(response.json()["ids"]) != 1:
                return response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            response.success()
