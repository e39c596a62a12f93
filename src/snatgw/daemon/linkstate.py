"""Link health as a state machine, without I/O (the daemon's probe sockets and netlink feed it;
tests feed it with an injected clock).  One LinkHealth per configured link (config.links.Link).

States:
  up          the link's rules run on it
  failed      no probe reply for fall x interval seconds (BFD-style dead timer), or no carrier:
              its rules run on the backup
  recovering  carrier back and `rise` probe rounds in a row answered: rules still on the
              backup until the link has stayed healthy for `hold` seconds

Rules are on the backup in `failed` and `recovering`.  Every transition is returned by the
method that caused it (and counted), so the caller applies the failover or the move back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UP, FAILED, RECOVERING = "up", "failed", "recovering"


@dataclass
class LinkHealth:
    name: str
    interval: float
    fall: int
    rise: int
    hold: float
    now: float  # start time: the first dead timer runs from here (a link dead at start goes down)
    state: str = UP
    carrier: bool = True
    last_reply: float = 0.0
    round: int = 0  # the current probe round's number
    answered: set[int] = field(default_factory=set)  # rounds that got a reply (recent ones)
    streak: int = 0  # answered rounds in a row (for rise)
    healthy_since: float | None = None  # recovering: since when
    transitions: int = 0
    since: float = 0.0  # when the current state began
    why: str = "start"

    def __post_init__(self) -> None:
        self.last_reply = self.since = self.now

    # ------------------------------------------------------------------ inputs
    def sent(self, now: float) -> str | None:
        """A probe round starts now (to every target).  The round before it, unanswered, breaks
        the rise streak.  Returns a transition, if the dead timer ran out."""
        if self.round and self.round not in self.answered:
            self.streak = 0
        self.round += 1
        self.answered = {r for r in self.answered if r > self.round - 4}
        return self.check(now)

    def reply(self, rnd: int, now: float) -> str | None:
        """A reply to round ``rnd`` arrived (any target)."""
        if rnd <= 0 or rnd > self.round:
            return None  # not one of ours, or a forged round number
        self.last_reply = max(self.last_reply, now)
        if rnd in self.answered:
            return None
        self.answered.add(rnd)
        self.streak += 1
        if self.state == FAILED and self.carrier and self.streak >= self.rise:
            return self._to(RECOVERING, now, f"{self.streak} probe rounds answered")
        return self.check(now)

    def set_carrier(self, on: bool, now: float) -> str | None:
        if on == self.carrier:
            return None
        self.carrier = on
        self.streak = 0
        if not on and self.state != FAILED:
            return self._to(FAILED, now, "carrier lost")
        return None

    def check(self, now: float) -> str | None:
        """Timers: the dead timer (up/recovering -> failed), the hold (recovering -> up)."""
        if self.state != FAILED and now - self.last_reply > self.interval * self.fall:
            return self._to(FAILED, now, f"no probe reply for {now - self.last_reply:.3f} s")
        if self.state == RECOVERING and now - (self.healthy_since or now) >= self.hold:
            return self._to(UP, now, f"healthy for {self.hold:g} s")
        return None

    def next_deadline(self) -> float:
        """When check() must run next for a timely transition (dead timer or hold end)."""
        dead = self.last_reply + self.interval * self.fall
        if self.state == RECOVERING:
            return min(dead, (self.healthy_since or 0.0) + self.hold)
        return dead

    # ------------------------------------------------------------------ outputs
    @property
    def on_backup(self) -> bool:
        return self.state != UP

    def _to(self, state: str, now: float, why: str) -> str:
        self.state, self.since, self.why = state, now, why
        self.transitions += 1
        if state == RECOVERING:
            self.healthy_since = now
        return state

    def as_dict(self, now: float) -> dict:
        return {"name": self.name, "state": self.state, "on_backup": self.on_backup, "carrier": self.carrier,
                "since": round(now - self.since, 3), "why": self.why, "last_reply": round(now - self.last_reply, 3),
                "transitions": self.transitions, "streak": self.streak}
