"""Records the order of ``backend.submit`` calls and reads of their ids, to tell steps enqueued ahead of the previous
step's results from steps run one after the other."""


class StepTrace:
    """Records the order of submits and id reads on ``engine``'s backend, and how many rows were fed."""

    def __init__(self, engine):
        self.engine, self.events, self.fed = engine, [], 0

    def __enter__(self):
        backend, submit = self.engine.backend, self.engine.backend.submit
        trace = self

        class Ids:
            def __init__(self, n, ids):
                self.n, self.ids = n, ids

            def tokens(self):
                trace.events.append(("read", self.n))
                return self.ids.tokens()

        def traced(step, sampling, feed=None):
            n = sum(1 for e in self.events if e[0] == "submit")
            self.events.append(("submit", n))
            self.fed += 0 if feed is None else int((feed >= 0).sum())
            return Ids(n, submit(step, sampling, feed))

        backend.submit = traced
        return self

    def __exit__(self, *exc):
        del self.engine.backend.submit

    def reads(self) -> list[int]:
        return [n for kind, n in self.events if kind == "read"]

    def submits(self) -> list[int]:
        return [n for kind, n in self.events if kind == "submit"]

    def ahead(self) -> int:
        """Steps submitted before the previous step's ids were read: 0 when every step ran synchronously."""
        at = {e: i for i, e in enumerate(self.events)}
        return sum(at[("submit", n + 1)] < at.get(("read", n), len(self.events)) for n in self.submits()[:-1])
