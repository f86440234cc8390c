// llava_ft chat page logic (served by serve/app.py at /static/app.js).
// Keeps the conversation in OpenAI form, sends it to /v1/chat/completions with stream: true and renders the
// server-sent deltas as they arrive. An image (picked or dropped) rides on the next user message as a
// base64 data: URL, and so does a video clip when the model takes video (LLaVA-OneVision: a `video_url`
// part); Reset forgets everything.
"use strict";

const $ = (id) => document.getElementById(id);
// attachment: { kind: "image" | "video", url: data URL } or null
const state = { model: null, history: [], attachment: null, video: false, busy: false, controller: null };

function setStatus(text) { $("status").textContent = text || ""; }

function addBubble(role, text, attachment) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (attachment) {
    const media = document.createElement(attachment.kind === "video" ? "video" : "img");
    media.src = attachment.url;
    if (attachment.kind === "video") { media.controls = true; media.muted = true; }
    else media.alt = "attached image";
    div.appendChild(media);
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setAttachment(attachment) {
  state.attachment = attachment;
  for (const [id, kind] of [["preview", "image"], ["preview-video", "video"]]) {
    const show = !!attachment && attachment.kind === kind;
    $(id).hidden = !show;
    if (show) $(id).src = attachment.url; else $(id).removeAttribute("src");
  }
  $("drop-hint").hidden = !!attachment;
}

function readMediaFile(file) {
  if (!file) return;
  const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
  if (!kind || (kind === "video" && !state.video)) {
    setStatus((state.video ? "not an image or a video: " : "not an image: ") + file.name);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => { setAttachment({ kind, url: reader.result }); setStatus(`${kind} ready: ${file.name}`); };
  reader.readAsDataURL(file);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) { h["Authorization"] = "Bearer " + key; localStorage.setItem("llava_ft_api_key", key); }
  return h;
}

async function errorText(resp) {
  try { const body = await resp.json(); return `${resp.status}: ${body.error.message}`; }
  catch (e) { return `HTTP ${resp.status}`; }
}

async function send(prompt) {
  const a = state.attachment;
  const part = a && (a.kind === "video" ? { type: "video_url", video_url: { url: a.url } }
                                        : { type: "image_url", image_url: { url: a.url } });
  const content = part ? [part, { type: "text", text: prompt }] : prompt;
  addBubble("user", prompt, a);
  const userMsg = { role: "user", content };
  state.history.push(userMsg);
  setAttachment(null);
  const bubble = addBubble("assistant streaming", "");
  const textEl = bubble.querySelector(".text");
  state.busy = true; $("send").disabled = true; setStatus("waiting for the model…");
  state.controller = new AbortController();
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: state.controller.signal,
      body: JSON.stringify({
        model: state.model, messages: state.history, stream: true,
        max_tokens: parseInt($("max-tokens").value, 10) || 128,
        temperature: parseFloat($("temperature").value) || 0,
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one SSE event per blank-line-terminated block
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
          if (delta && delta.content) { answer += delta.content; textEl.textContent = answer; setStatus("answering…"); }
          if (obj.usage) setStatus(`${obj.usage.prompt_tokens} prompt + ${obj.usage.completion_tokens} answer tokens`);
        }
        bubble.scrollIntoView({ block: "end" });
      }
    }
    state.history.push({ role: "assistant", content: answer });
  } catch (err) {
    // the turn failed: drop it from the history so the next question does not carry it
    state.history.pop();
    bubble.remove();
    if (err.name !== "AbortError") { addBubble("error", String(err.message || err)); setStatus(""); }
  } finally {
    bubble.classList.remove("streaming");
    state.busy = false; state.controller = null; $("send").disabled = false;
  }
}

function reset() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("log").innerHTML = "";
  setAttachment(null);
  setStatus("conversation cleared");
}

async function init() {
  const saved = localStorage.getItem("llava_ft_api_key");
  if (saved) $("api-key").value = saved;
  try {
    const health = await (await fetch("/health")).json();
    state.model = health.model;
    state.video = !!health.supports_video;
    $("model-name").textContent = `model: ${health.model}` +
      (state.video ? " (text + images + video)" : health.supports_images ? " (text + images)" : " (text)");
    $("key-box").hidden = !health.auth_required;
    if (!health.supports_images) $("drop").hidden = true;
    if (state.video) {
      $("image-input").accept = "image/*,video/*";
      $("drop-hint").innerHTML = "Drop an image or a clip<br>or click to pick";
    }
  } catch (err) {
    $("model-name").textContent = "server unreachable";
  }
  $("drop").addEventListener("click", () => $("image-input").click());
  $("image-input").addEventListener("change", (e) => readMediaFile(e.target.files[0]));
  // the whole window accepts a dropped image, not only the small box
  for (const type of ["dragenter", "dragover"]) {
    window.addEventListener(type, (e) => { e.preventDefault(); $("drop").classList.add("over"); });
  }
  window.addEventListener("dragleave", () => $("drop").classList.remove("over"));
  window.addEventListener("drop", (e) => {
    e.preventDefault(); $("drop").classList.remove("over");
    readMediaFile(e.dataTransfer.files && e.dataTransfer.files[0]);
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.busy) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("reset").addEventListener("click", reset);
}

init();
