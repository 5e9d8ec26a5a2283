"""Validation rules of GenerationRequest: each bad setting is refused with the field it concerns."""

import math

import pytest

from vidsynth import GenerationRequest, RequestError

BAD = [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": "   \n"}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "between 1 and"),
    ({"prompt": "a" * 2001}, "prompt", "at most 2000 characters"),
    ({"prompt": ["a", "b" * 2001]}, "prompt", "at most 2000 characters"),
    ({"negative_prompt": "c" * 2001}, "negative_prompt", "at most 2000 characters"),
    ({"frames": 0}, "frames", "greater than or equal to 1"),
    ({"frames": 10_000}, "frames", "less than or equal to 256"),
    ({"height": 100}, "height", "multiple of 8"),
    ({"width": 0}, "width", "greater than or equal to 8"),
    ({"width": 4096}, "width", "less than or equal to 2048"),
    ({"steps": 0}, "steps", "greater than or equal to 1"),
    ({"steps": 1000}, "steps", "less than or equal to 500"),
    ({"guidance": -1.0}, "guidance", "greater than or equal to 0"),
    ({"guidance": math.nan}, "guidance", "finite"),
    ({"guidance": math.inf}, "guidance", "finite"),
    ({"scheduler": "plms"}, "scheduler", "'ddim'"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"num_videos": 0}, "num_videos", "greater than or equal to 1"),
    ({"eta": 2.0}, "eta", "less than or equal to 1"),
    ({"colour": "red"}, "colour", "unknown setting"),
    ({"num_inference_steps": 25}, "num_inference_steps", "unknown setting; vidsynth calls it 'steps'"),  # diffusers' name
    ({"guidance_scale": 7.5}, "guidance_scale", "vidsynth calls it 'guidance'"),
]


@pytest.mark.parametrize("fields, field, words", BAD, ids=[str(b[0])[:60] for b in BAD])
def test_bad_settings_name_their_field(fields, field, words):
    with pytest.raises(RequestError) as error:
        GenerationRequest.create(**{"prompt": "a red circle", **fields})
    assert error.value.field == field
    assert words in error.value.message


def test_empty_prompt_allowed_when_asked():
    assert GenerationRequest.create(prompt="", allow_empty_prompt=True).prompts == [""]


def test_good_request_keeps_what_was_given():
    request = GenerationRequest.create(prompt=["a", "b"], seed=3, frames=8, height=320, width=576, num_videos=2)
    assert request.prompts == ["a", "b"] and request.total_videos == 4
    assert (request.frames, request.height, request.width, request.seed) == (8, 320, 576, 3)
