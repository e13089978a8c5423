"""A per-request work budget: decoder steps and output audio summed over every text fragment and
batch item of one request.

`max_decoder_steps` bounds one fragment, and text splits into fragments on punctuation, so a
short text of many commas could ask for hundreds of times that work. The budget is checked twice:
before any work against the least work the text can take (`check_plan`: every fragment runs at
least until the stop rule may fire), and before every decoder step while it runs (`guard`). Either
way the answer is `BudgetExceeded` (413 naming the limit), never a truncated result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from voxport.errors import BudgetExceeded

StopCheck = Callable[[], bool]


def min_steps_per_fragment(frames_per_step: int, max_steps: int) -> int:
    """Steps a fragment takes at least: the stop rule fires only once step·r > 10 (synthesizer_loop)."""
    return min(max_steps, 10 // frames_per_step + 2)


@dataclass
class WorkBudget:
    max_steps: int  # decoder steps over the whole request
    max_audio_s: float  # seconds of output audio over the whole request
    frames_per_step: int  # mel frames one decoder step makes (the synthesizer's r)
    frame_seconds: float  # seconds of audio per mel frame (hop / sample rate)
    speaking_rate: float = 1.0  # output frames = decoder frames / rate
    steps: int = 0

    def _audio_s(self, steps: int) -> float:
        return steps * self.frames_per_step * self.frame_seconds / self.speaking_rate

    def check_plan(self, n_fragments: int, steps_per_fragment: int) -> None:
        """413 before any work when even the least work the fragments can take is over budget."""
        least = n_fragments * min_steps_per_fragment(self.frames_per_step, steps_per_fragment)
        if least > self.max_steps:
            raise BudgetExceeded("max_request_decoder_steps", f"the text has {n_fragments} fragments needing at "
                                 f"least {least} decoder steps; at most {self.max_steps} per request")
        self._check_audio(least, "at least ")

    def _check_audio(self, steps: int, qualifier: str) -> None:
        seconds = self._audio_s(steps)
        if seconds > self.max_audio_s:
            raise BudgetExceeded("max_request_audio_seconds", f"the request makes {qualifier}{seconds:.1f} s of "
                                 f"audio; at most {self.max_audio_s:g} s per request")

    def charge(self) -> None:
        """Count one decoder step about to run; BudgetExceeded if it would go over a limit."""
        if self.steps + 1 > self.max_steps:
            raise BudgetExceeded("max_request_decoder_steps", f"the request used its {self.max_steps} decoder "
                                 "steps before the text was spoken")
        self._check_audio(self.steps + 1, "more than ")
        self.steps += 1

    def guard(self, should_stop: StopCheck) -> StopCheck:
        """`should_stop` that also charges a step: the synthesizer calls it before every decoder step."""

        def check() -> bool:
            self.charge()
            return should_stop()

        return check
