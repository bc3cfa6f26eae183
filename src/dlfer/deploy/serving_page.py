"""The web page `dlfer serve` shows at /: upload a photo or take a webcam picture, see the faces.

Self-contained (no script or style from the network), so it works on an offline machine. The
page sends the picture as base64 JSON to /annotate and shows the photo with each face's box and
number drawn by the server (dlfer.deploy.predict.draw_faces, as `dlfer predict --annotate` draws them)
and a table with each face's emotion and 7 probabilities under the same numbers.
"""

from dlfer.fer2013 import EMOTIONS

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dlfer: facial emotions</title>
<style>
  [hidden] { display: none !important; }
  body { font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 70rem; color: #222; }
  fieldset { border: 1px solid #ccc; padding: 0.8rem; margin-bottom: 1rem; }
  #status { min-height: 1.4em; font-weight: 600; }
  #status.problem { color: #b00020; }
  #annotated { max-width: 100%; max-height: 70vh; display: block; margin: 0.5rem 0; }
  video { max-width: 24rem; display: block; margin: 0.5rem 0; }
  table { border-collapse: collapse; margin-top: 0.5rem; }
  th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; }
  th:nth-child(2), td:nth-child(2) { text-align: left; }
  td.best { font-weight: 700; background: #e6f4ea; }
  .bar { display: inline-block; height: 0.6em; background: #34a853; margin-left: 0.3em; vertical-align: middle; }
</style>
</head>
<body>
<h1>Facial emotions</h1>
<p>Faces are found with OpenCV's frontal-face detector and numbered in reading order (left to right,
top to bottom); the model gives each face the probability of 7 emotions. The same model answers
<code>POST /invocations</code> (MLflow's scoring protocol).</p>
<fieldset>
  <label>Photo: <input type="file" id="photo" accept="image/*"></label>
  <label><input type="checkbox" id="crop"> already a face crop (like FER2013's 48x48 images): no detection</label>
  <div id="webcam" hidden>
    <button type="button" id="camera">Use the webcam</button>
    <button type="button" id="capture" hidden>Take the picture</button>
    <video id="video" autoplay playsinline muted hidden></video>
  </div>
</fieldset>
<p id="status" role="status">Choose a photo.</p>
<img id="annotated" alt="the photo with each face's box and number" hidden>
<table id="faces" hidden>
  <thead><tr><th>face</th><th>emotion</th>EMOTION_HEADERS</tr></thead>
  <tbody></tbody>
</table>
<script>
const EMOTIONS = EMOTION_LIST;
const status = document.getElementById("status");
const crop = document.getElementById("crop");
const annotated = document.getElementById("annotated");
const table = document.getElementById("faces");

function say(text, problem) {
  status.textContent = text;
  status.className = problem ? "problem" : "";
}

function base64Of(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function showFaces(faces) {
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const face of faces) {
    const row = body.insertRow();
    row.insertCell().textContent = face.face;
    row.insertCell().textContent = face.emotion;
    for (const emotion of EMOTIONS) {
      const probability = face["probability_" + emotion];
      const cell = row.insertCell();
      cell.textContent = (100 * probability).toFixed(1) + "%";
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = (3 * probability).toFixed(2) + "em";
      cell.append(bar);
      if (emotion === face.emotion) cell.className = "best";
    }
  }
  table.hidden = faces.length === 0;
}

async function classify(blob) {
  say("Looking for faces...");
  document.body.dataset.state = "busy";
  try {
    const response = await fetch("annotate", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({image: await base64Of(blob), detect: !crop.checked}),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.message || response.statusText);
    annotated.src = "data:image/png;base64," + answer.annotated;
    annotated.hidden = false;
    showFaces(answer.faces);
    const found = answer.faces.length + (answer.faces.length === 1 ? " face" : " faces");
    say(answer.problem ? found + ": " + answer.problem : found, answer.faces.length === 0);
  } catch (error) {
    say("Could not classify this picture: " + error.message, true);
    annotated.hidden = true;
    table.hidden = true;
  }
  document.body.dataset.state = "done";
}

document.getElementById("photo").addEventListener("change", (event) => {
  if (event.target.files.length) classify(event.target.files[0]);
});

// The webcam needs a secure context (https or localhost) and a browser that offers it.
if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
  const video = document.getElementById("video");
  const capture = document.getElementById("capture");
  document.getElementById("webcam").hidden = false;
  document.getElementById("camera").addEventListener("click", async () => {
    try {
      video.srcObject = await navigator.mediaDevices.getUserMedia({video: true});
      video.hidden = false;
      capture.hidden = false;
    } catch (error) {
      say("No webcam: " + error.message, true);
    }
  });
  capture.addEventListener("click", () => {
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    canvas.toBlob(classify, "image/jpeg", 0.92);
  });
}
</script>
</body>
</html>
"""

# Filled in by replace: str.format would trip over the braces of the CSS and the script.
PAGE = (TEMPLATE.replace("EMOTION_HEADERS", "".join(f"<th>{emotion}</th>" for emotion in EMOTIONS))
        .replace("EMOTION_LIST", "[" + ", ".join(f'"{emotion}"' for emotion in EMOTIONS) + "]"))
