"""The base of the Locust users here: a few ms between tasks, and the API key when set."""

import os

from locust import HttpUser, between


class ServiceUser(HttpUser):
    abstract = True  # not a user of its own
    wait_time = between(0.0, 0.01)

    def on_start(self):
        if os.environ.get("API_KEY"):
            self.client.headers["Authorization"] = f"Bearer {os.environ['API_KEY']}"
