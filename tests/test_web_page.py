"""The web page in a real headless Chromium (the system's, driven by Playwright), against a live server."""

from __future__ import annotations

import os
import re
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import LiveServer
from vidsynth import GenerationRequest
from vidsynth.request import MAX_FRAMES, MAX_SIDE
from vidsynth.server import ServerSettings, create_app
from vidsynth.video import read_frames


def chromium_path() -> str:
    path = os.environ.get("VIDSYNTH_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the browser test needs Chromium: apt-get install chromium (or set VIDSYNTH_CHROMIUM)"
    return path


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(shipped_pipeline, tmp_path_factory):
    data = tmp_path_factory.mktemp("web-data")
    with LiveServer(create_app(ServerSettings(data_dir=data), pipeline=shipped_pipeline)) as live:
        yield live


def submit_and_play(page, site, previous_id: str) -> dict:
    """Submit the form, wait until the page plays the new job's video, and return that job."""
    page.click("#submit")
    page.wait_for_function(f"current && current.id !== '{previous_id}' && !document.querySelector('#player').hidden",
                           timeout=120_000)
    return httpx.get(f"{site.url}/v1/videos", params={"limit": 1}).json()["data"][0]


def test_make_watch_download_cancel_and_history(browser, site, artifacts, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, accept_downloads=True)  # a phone's width
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site.url)
    page.wait_for_function("document.querySelector('#scheduler').options.length > 0")
    assert page.text_content("#vocabulary").startswith("vidsynth-tiny knows only the 27 words of its training "
                                                        "captions: a, and, background, black, blue, circle,")
    # The empty settings show what the chosen preset makes of them for this model.
    assert page.get_attribute("#steps", "placeholder") == "6"
    page.select_option("#preset", "fast")
    assert page.get_attribute("#steps", "placeholder") == "3"
    assert page.locator("#scheduler option").first.text_content() == "preset's (dpm++)"
    page.select_option("#preset", "quality")
    # Each field's range and meaning come from the request's schema, the rules the server applies.
    assert (page.get_attribute("#frames", "min"), page.get_attribute("#frames", "max")) == ("1", str(MAX_FRAMES))
    assert (page.get_attribute("#width", "min"), page.get_attribute("#width", "max")) == ("8", str(MAX_SIDE))
    assert (page.get_attribute("#seed", "min"), page.get_attribute("#seed", "max")) == ("0", None)  # 2^63-1: inexact
    assert page.get_attribute("#steps", "title") == GenerationRequest.model_fields["steps"].description

    # A bad setting is shown next to its field.
    page.fill("#prompt", "a red circle moving left on a black background")
    page.click("summary")
    page.fill("#frames", "0")
    page.click("#submit")
    page.wait_for_function("document.querySelector('[data-error-for=frames]').textContent.length > 0")
    assert "greater than or equal to 1" in page.text_content("[data-error-for=frames]")

    # Make a video and watch the progress move.
    page.fill("#frames", "16")
    page.fill("#steps", "20")
    page.fill("#seed", "5")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#progress').value > 5 && document.querySelector('#progress').value < 100")
    assert "denoising step" in page.text_content("#phase")
    estimate = page.wait_for_function("() => { const text = document.querySelector('#phase').textContent; "
                                      "return text.includes('left') && text; }").json_value()
    assert re.fullmatch(r"denoising step \d+/20, about \d+ s left", estimate), estimate
    page.wait_for_function("!document.querySelector('#player').hidden", timeout=120_000)
    page.wait_for_function("document.querySelector('#player').readyState >= 2 && document.querySelector('#player').duration > 0",
                           timeout=30_000)
    assert not page.is_visible("#cancel") and page.is_visible("#download")
    page.evaluate("document.querySelector('#player').play()")
    page.wait_for_function("document.querySelector('#player').currentTime > 0")
    assert page.evaluate("document.querySelector('#player').error") is None
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling on a phone
    # the finished job heads the history, with its thumbnail
    page.wait_for_function("document.querySelector('#history li:first-child img').naturalWidth > 0")
    page.screenshot(path=str(artifacts / "web-page.png"), full_page=True)

    with page.expect_download() as download:
        page.click("#download")
    saved = tmp_path / "download.mp4"
    download.value.save_as(saved)
    frames, fps = read_frames(saved)
    assert frames.shape == (16, 64, 64, 3) and fps == 8
    with page.expect_download() as download:
        page.click("#download-gif")
    download.value.save_as(tmp_path / "download.gif")
    assert download.value.suggested_filename.endswith(".gif") and Image.open(tmp_path / "download.gif").n_frames == 16

    # The page's address names the job it shows: opened elsewhere, it shows that job's video.
    first = httpx.get(f"{site.url}/v1/videos", params={"limit": 1}).json()["data"][0]
    assert page.evaluate("location.hash") == f"#{first['id']}"
    linked = browser.new_page()
    linked.goto(f"{site.url}/#{first['id']}")
    linked.wait_for_function("document.querySelector('#player').readyState >= 2", timeout=30_000)
    assert linked.text_content("#job-prompt") == "a red circle moving left on a black background (seed 5)"
    linked.close()

    # The next video starts from this one, then "start from noise" goes back to text-to-video.
    assert page.is_hidden("#start-from")
    page.click("#start-from-this")
    assert page.is_visible("#start-from") and first["id"] in page.text_content("#start-video")
    assert page.get_attribute("#strength", "placeholder") == "0.75"  # the default, from the server
    page.fill("#prompt", "a blue circle moving left on a black background")
    page.fill("#strength", "0.5")
    restyled = submit_and_play(page, site, first["id"])
    assert restyled["request"]["init_video"] == first["id"] and restyled["request"]["strength"] == 0.5
    assert restyled["status"] == "completed" and restyled["request"]["frames"] == 16
    page.screenshot(path=str(artifacts / "web-page-video-to-video.png"), full_page=True)
    page.click("#clear-start")
    assert page.is_hidden("#start-from") and page.input_value("#init_video") == ""

    # An image from the user's disk starts the next one (image-to-video).
    image = np.full((64, 64, 3), 255, np.uint8)
    image[24:40, 8:24] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "square.png")
    page.set_input_files("#start-file", str(tmp_path / "square.png"))
    page.wait_for_function("!document.querySelector('#start-from').hidden")
    assert "square.png (64x64)" in page.text_content("#start-video")
    page.fill("#prompt", "a red square moving right on a white background")
    page.fill("#strength", "0.9")
    page.fill("#steps", "6")
    animated = submit_and_play(page, site, restyled["id"])
    assert animated["request"]["init_video"].startswith("upload_") and animated["status"] == "completed"
    page.set_input_files("#start-file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
    page.wait_for_function("document.querySelector('[data-error-for=body]').textContent.length > 0")
    assert "not a readable image/png file" in page.text_content("[data-error-for=body]")
    assert page.is_hidden("#start-from")

    # A long job, cancelled from the page; the model warns that it never saw one of the prompt's words.
    assert page.is_hidden("#job-warnings")
    page.fill("#prompt", "a red car moving left on a black background")
    page.fill("#steps", "400")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#phase').textContent.includes('denoising step')")
    assert page.is_visible("#job-warnings") and "never saw 'car'" in page.text_content("#job-warnings")
    page.screenshot(path=str(artifacts / "web-page-warning.png"), full_page=True)
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#job-status').textContent === 'canceled'")
    assert not page.is_visible("#cancel") and not page.is_visible("#player")
    assert page.locator("#job-warnings li").count() == 1  # the job's own list and its stream say it once

    # After a reload the history lists the jobs; "use these settings" refills the form, start video included.
    page.reload()
    page.wait_for_function("document.querySelectorAll('#history li').length >= 4")
    items = page.locator("#history li")
    assert "canceled" in items.nth(0).text_content() and "completed" in items.nth(3).text_content()
    assert "seed 5" in items.nth(3).text_content()
    page.wait_for_function("document.querySelector('#history li:nth-child(4) img').naturalWidth > 0")
    items.nth(2).locator("button.reuse").click()
    assert page.input_value("#init_video") == first["id"] and page.input_value("#strength") == "0.5"
    items.nth(3).locator("button.reuse").click()
    assert page.input_value("#seed") == "5" and page.input_value("#steps") == "20"
    assert page.is_hidden("#start-from")
    items.nth(0).locator(".text").click()
    assert "never saw 'car'" in page.text_content("#job-warnings")  # kept with the job
    items.nth(3).locator(".text").click()
    page.wait_for_function("document.querySelector('#player').readyState >= 2")
    assert page.is_hidden("#job-warnings")
    page.screenshot(path=str(artifacts / "web-page-history.png"), full_page=True)
    assert errors == []
    page.close()


def test_a_job_of_several_videos_shows_each_and_starts_from_any_of_them(browser, site, artifacts, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site.url)
    page.wait_for_function("document.querySelector('#scheduler').options.length > 0")
    page.fill("#prompt", "a green square moving up on a white background")
    page.click("summary")
    for field, value in {"num_videos": "3", "seed": "7", "frames": "8", "steps": "3"}.items():
        page.fill(f"#{field}", value)
    job = submit_and_play(page, site, "")
    assert job["outputs"] == 3 and job["request"]["num_videos"] == 3
    buttons = page.locator("#outputs button")
    assert buttons.count() == 3 and buttons.nth(0).get_attribute("aria-pressed") == "true"
    assert page.text_content("#job-prompt") == "a green square moving up on a white background (seed 7)"

    buttons.nth(2).click()
    assert page.text_content("#job-prompt") == "a green square moving up on a white background (seed 9)"
    assert buttons.nth(2).get_attribute("aria-pressed") == "true"
    assert buttons.nth(0).get_attribute("aria-pressed") == "false"
    page.wait_for_function("document.querySelector('#player').readyState >= 2", timeout=30_000)
    page.screenshot(path=str(artifacts / "web-page-several-videos.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == f"{job['id']}-2.mp4"  # the server's name: the API's index
    download.value.save_as(tmp_path / "third.mp4")
    served = [httpx.get(f"{site.url}/v1/videos/{job['id']}/content", params={"index": index}).content
              for index in (0, 2)]
    assert (tmp_path / "third.mp4").read_bytes() == served[1] != served[0]
    assert read_frames(tmp_path / "third.mp4")[0].shape == (8, 64, 64, 3)

    # The next video starts from the one shown, by the API's name for a job's other videos.
    page.click("#start-from-this")
    assert page.input_value("#init_video") == f"{job['id']}/2" and "(seed 9)" in page.text_content("#start-video")
    page.fill("#num_videos", "")
    page.fill("#strength", "0.5")
    restyled = submit_and_play(page, site, job["id"])
    assert restyled["request"]["init_video"] == f"{job['id']}/2" and restyled["status"] == "completed"
    assert restyled["outputs"] == 1 and page.is_hidden("#outputs")
    assert errors == []
    page.close()


def test_the_page_says_while_a_compiled_server_compiles_for_its_first_video(browser, held_compile, artifacts,
                                                                              tmp_path):
    with LiveServer(create_app(ServerSettings(data_dir=tmp_path), pipeline=held_compile.pipeline)) as live:
        page = browser.new_page(viewport={"width": 390, "height": 844})
        page.goto(live.url)
        page.wait_for_selector("#warming-up", state="visible")
        assert "compiling its model" in page.text_content("#warming-up")
        page.screenshot(path=str(artifacts / "web-page-compiling.png"))
        held_compile.release.set()
        page.wait_for_selector("#warming-up", state="hidden", timeout=30_000)
        page.close()
    assert held_compile.compiled_at
