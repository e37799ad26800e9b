// The live transcription page: the microphone, captured by an AudioWorklet at
// the AudioContext's own rate, goes to the server's stream WebSocket as raw
// little-endian 16-bit PCM in binary messages of 100 ms; the rate is declared
// in the URL and the server resamples.  Partial text is shown as it comes,
// each finished utterance as a line with its times and its words shaded by
// confidence.
//
// The WebSocket is the page's own origin at /ws (wss: on an https: page), or
// the one given as ?server=ws://HOST:PORT (say, the server's --ws-port).

"use strict";

(function () {
  const CHUNK_SECONDS = 0.1;
  // The rates the server converts from.
  const MIN_RATE = 8000;
  const MAX_RATE = 48000;
  // Seconds of audio captured before the server's hello, kept and sent then.
  const MAX_QUEUED_SECONDS = 30;
  // Seconds of audio waiting in the browser's send buffer before the page
  // says that the connection cannot keep up.
  const SLOW_SECONDS = 3;
  const SLOW_TEXT = "The connection to the server is too slow: audio is piling up in " +
    "the browser, and results will come late.";

  const params = new URLSearchParams(location.search);
  const $ = (id) => document.getElementById(id);
  const ui = {
    start: $("start"),
    stop: $("stop"),
    clear: $("clear"),
    token: $("token"),
    status: $("status"),
    level: $("level"),
    sent: $("sent"),
    error: $("error"),
    utterances: $("utterances"),
    partial: $("partial"),
    empty: $("empty"),
    serverUrl: $("server-url"),
    modelName: $("model-name"),
    model: $("model"),
    modelNote: $("model-note"),
  };

  // What the models the server names in its hello can recognise, where it
  // is worth saying.
  const MODEL_NOTES = {
    demo: "This server runs the built-in demo model. It knows a voice " +
      "assistant's words only: digits and PINs, numbers, times, and commands such " +
      "as \u201cset an alarm for seven thirty\u201d, \u201cturn off the kitchen " +
      "lights\u201d or \u201cwhat is the weather in paris tomorrow\u201d. Other " +
      "words come out as the nearest ones it knows.",
  };

  function showModel(name) {
    ui.model.textContent = name;
    ui.modelName.hidden = false;
    ui.modelNote.textContent = MODEL_NOTES[name] || "";
    ui.modelNote.hidden = !MODEL_NOTES[name];
  }

  // Where the stream WebSocket is.

  function serverBase() {
    const override = params.get("server");
    const url = new URL(override || "/ws", location.href);
    if (url.protocol === "http:") {
      url.protocol = "ws:";
    } else if (url.protocol === "https:") {
      url.protocol = "wss:";
    }
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new Error("the server address must be ws:// or wss://, not " + url.protocol);
    }
    return url;
  }

  function streamUrl(sampleRate, token) {
    const url = serverBase();
    url.searchParams.set("sample_rate", String(sampleRate));
    url.searchParams.set("encoding", "pcm16");
    if (token) {
      url.searchParams.set("token", token);
    }
    return url.toString();
  }

  // What the page shows.

  function setState(state, text) {
    document.body.dataset.state = state;
    if (text !== undefined) {
      ui.status.textContent = text;
    }
    const busy = state === "starting" || state === "listening" || state === "finishing";
    ui.start.disabled = busy;
    ui.stop.disabled = !(state === "starting" || state === "listening");
    ui.token.disabled = busy;
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function hideError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  function showLevel(peak) {
    // -60 dBFS to 0 dBFS across the meter.
    const db = peak > 0 ? 20 * Math.log10(peak) : -100;
    const share = Math.max(0, Math.min(1, (db + 60) / 60));
    ui.level.style.width = (share * 100).toFixed(0) + "%";
  }

  function showSent(seconds) {
    document.body.dataset.sentSeconds = seconds.toFixed(1);
    ui.sent.textContent = seconds > 0 ? seconds.toFixed(1) + " s sent" : "";
  }

  function seconds(ms) {
    return (ms / 1000).toFixed(2);
  }

  function confidenceClass(confidence) {
    if (confidence >= 0.9) return "conf-high";
    if (confidence >= 0.7) return "conf-mid";
    if (confidence >= 0.5) return "conf-low";
    return "conf-poor";
  }

  // The transcript: finished utterances, and the one under way.

  class Transcript {
    constructor() {
      this.doneText = "";
      this.lines = 0;
    }

    newStream() {
      this.doneText = "";
      this.lines = 0;
      if (ui.utterances.children.length > 0) {
        const rule = document.createElement("li");
        rule.className = "separator";
        rule.setAttribute("aria-hidden", "true");
        ui.utterances.appendChild(rule);
      }
    }

    result(message) {
      const utterance = message.utterance;
      if (utterance) {
        this.doneText = message.text;
        this.setPartial("");
        if (utterance.text) {
          this.addUtterance(utterance);
        }
      } else if (!message.is_final) {
        const text = message.text || "";
        const partial = text.startsWith(this.doneText)
          ? text.slice(this.doneText.length).trim() : text;
        this.setPartial(partial);
      }
      if (message.is_final) {
        this.setPartial("");
        if (this.lines === 0 && message.text && message.text.trim()) {
          // A server that does not mark utterances: the whole text, untimed.
          this.addUtterance({ text: message.text.trim(), words: [] });
        }
      }
    }

    setPartial(text) {
      ui.partial.textContent = text;
      ui.partial.hidden = !text;
      this.scroll();
    }

    addUtterance(utterance) {
      const line = document.createElement("li");
      line.className = "utterance";
      if (utterance.start_ms !== undefined) {
        line.dataset.startMs = utterance.start_ms;
        line.dataset.endMs = utterance.end_ms;
        const times = document.createElement("span");
        times.className = "times";
        times.textContent = seconds(utterance.start_ms) + "\u2013" + seconds(utterance.end_ms) +
          " s";
        line.appendChild(times);
      }
      const words = document.createElement("span");
      words.className = "words";
      if (utterance.words && utterance.words.length) {
        utterance.words.forEach((word, i) => {
          if (i > 0) {
            words.appendChild(document.createTextNode(" "));
          }
          const span = document.createElement("span");
          span.className = "word " + confidenceClass(word.confidence);
          span.textContent = word.word;
          span.dataset.confidence = String(word.confidence);
          span.title = word.word + ": confidence " + Math.round(word.confidence * 100) +
            "%, " + seconds(word.start_ms) + "\u2013" + seconds(word.end_ms) + " s";
          words.appendChild(span);
        });
      } else {
        words.textContent = utterance.text;
      }
      line.appendChild(words);
      ui.utterances.appendChild(line);
      ui.empty.hidden = true;
      this.lines += 1;
      this.scroll();
    }

    scroll() {
      ui.partial.scrollIntoView({ block: "nearest" });
    }
  }

  const transcript = new Transcript();

  // The microphone.

  function microphoneError(error) {
    switch (error && error.name) {
      case "NotAllowedError":
      case "PermissionDeniedError":
      case "SecurityError":
        return "Microphone access was denied. Allow this page to use the microphone " +
          "(the icon in the address bar) and press Start again.";
      case "NotFoundError":
      case "DevicesNotFoundError":
      case "OverconstrainedError":
        return "No microphone was found. Connect one and press Start again.";
      case "NotReadableError":
      case "TrackStartError":
      case "AbortError":
        return "The microphone could not be started: another program may be using it " +
          "(" + error.message + ").";
      default:
        return "The microphone could not be opened: " + (error && error.message || error);
    }
  }

  async function openMicrophone() {
    if (!window.isSecureContext) {
      throw new Error("This page is not a secure context, and browsers give the " +
        "microphone only to pages served over https:// or from localhost. Open it as " +
        "https://" + location.host + location.pathname + " (a server with TLS), or " +
        "as http://localhost:PORT/ on the server's own machine.");
    }
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error("This browser gives pages no access to a microphone " +
        "(navigator.mediaDevices.getUserMedia is missing).");
    }
    if (!window.AudioWorkletNode) {
      throw new Error("This browser has no AudioWorklet, which the page needs to " +
        "capture audio. Use a current Chrome, Edge, Firefox or Safari.");
    }
    try {
      return await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: 1,
          echoCancellation: false,
          noiseSuppression: false,
          autoGainControl: false,
        },
        video: false,
      });
    } catch (error) {
      throw new Error(microphoneError(error));
    }
  }

  async function openCapture(media, onMessage) {
    let context = new AudioContext();
    if (context.sampleRate < MIN_RATE || context.sampleRate > MAX_RATE) {
      // The server takes 8 to 48 kHz: let the browser convert.
      const rate = context.sampleRate > MAX_RATE ? MAX_RATE : MIN_RATE;
      await context.close();
      context = new AudioContext({ sampleRate: rate });
    }
    await context.audioWorklet.addModule("capture-worklet.js");
    const source = context.createMediaStreamSource(media);
    const node = new AudioWorkletNode(context, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
      processorOptions: { chunkSeconds: CHUNK_SECONDS },
    });
    node.port.onmessage = (event) => onMessage(event.data);
    source.connect(node);
    await context.resume();
    return { context, source, node };
  }

  // One stream: from Start to its final result (or an error).

  class Session {
    constructor(token) {
      this.token = token;
      this.socket = null;
      this.media = null;
      this.capture = null;
      this.rate = 0;
      this.queue = [];
      this.queuedBytes = 0;
      this.sentBytes = 0;
      this.ready = false;        // the server said hello
      this.opened = false;       // the WebSocket opened
      this.stopping = false;
      this.finished = false;     // the final result came
      this.failed = false;
      this.lastError = null;
      this.slow = false;
    }

    async start() {
      setState("starting", "Opening the microphone\u2026");
      try {
        this.media = await openMicrophone();
        if (this.abandoned()) return;
        this.media.getAudioTracks().forEach((track) => {
          track.addEventListener("ended", () => {
            if (!this.stopping && !this.failed && !this.finished) {
              this.fail("The microphone stopped (unplugged, or taken by another program).");
            }
          });
        });
        this.capture = await openCapture(this.media, (message) => this.captured(message));
        if (this.abandoned()) return;
        this.rate = this.capture.context.sampleRate;
      } catch (error) {
        this.fail(error.message || String(error));
        return;
      }
      this.connect();
    }

    // Stopped or failed while the microphone was being opened.
    abandoned() {
      if (this.stopping && !this.failed) {
        this.release();
        setState("idle", "Stopped.");
      }
      return this.stopping || this.failed;
    }

    connect() {
      let url;
      try {
        url = streamUrl(this.rate, this.token);
        this.socket = new WebSocket(url);
      } catch (error) {
        this.fail("Bad server address: " + (error.message || error));
        return;
      }
      setState("starting", "Connecting to the server\u2026");
      this.socket.binaryType = "arraybuffer";
      this.socket.onopen = () => {
        this.opened = true;
      };
      this.socket.onmessage = (event) => this.received(event.data);
      this.socket.onclose = (event) => this.closed(event);
      // The reason comes with the close event that follows.
      this.socket.onerror = () => {};
    }

    captured(message) {
      if (message.type === "flushed") {
        // Every sample is with the server: ask it to finish the stream.
        if (this.ready && this.socket.readyState === WebSocket.OPEN) {
          this.socket.send(JSON.stringify({ type: "close" }));
        }
        this.closeAudio();
        return;
      }
      showLevel(message.peak);
      if (this.failed || this.finished) {
        return;
      }
      if (!this.ready) {
        // Kept until the server's hello, so the first words are not lost.
        if (this.queuedBytes < MAX_QUEUED_SECONDS * this.rate * 2) {
          this.queue.push(message.pcm);
          this.queuedBytes += message.pcm.byteLength;
        }
        return;
      }
      this.send(message.pcm);
    }

    send(pcm) {
      if (this.socket.readyState !== WebSocket.OPEN) {
        return;
      }
      this.socket.send(pcm);
      this.sentBytes += pcm.byteLength;
      showSent(this.sentBytes / 2 / this.rate);
      const slow = this.socket.bufferedAmount > SLOW_SECONDS * this.rate * 2;
      if (slow !== this.slow) {
        this.slow = slow;
        if (slow) {
          showError(SLOW_TEXT);
        } else if (ui.error.textContent === SLOW_TEXT) {
          hideError();
        }
      }
    }

    received(data) {
      if (typeof data !== "string") {
        return;
      }
      let message;
      try {
        message = JSON.parse(data);
      } catch (error) {
        return;
      }
      if (message.type === "hello") {
        this.ready = true;
        if (message.model) {
          showModel(message.model);
        }
        transcript.newStream();
        setState("listening", "Listening: speak now. Stream " + message.stream_id +
          ", " + (this.rate / 1000) + " kHz audio.");
        const queued = this.queue;
        this.queue = [];
        queued.forEach((pcm) => this.send(pcm));
        if (this.stopping) {
          this.capture.node.port.postMessage("flush");
        }
      } else if (message.type === "result") {
        transcript.result(message);
        if (message.is_final) {
          this.finished = true;
          setState("done", "Done: " + transcript.lines + " utterance" +
            (transcript.lines === 1 ? "" : "s") + ".");
          this.release();
        }
      } else if (message.type === "error") {
        this.lastError = message.message;
        showError(serverError(message.message));
      }
    }

    stop() {
      if (this.stopping || this.failed || this.finished) {
        return;
      }
      this.stopping = true;
      if (!this.capture) {
        // Still opening the microphone: start() gives up once it has.
        setState("finishing", "Stopping\u2026");
        return;
      }
      // No more audio: the worklet hands over what it still holds.
      this.capture.source.disconnect();
      this.stopMicrophone();
      if (this.ready) {
        setState("finishing", "Finishing: waiting for the final result\u2026");
        this.capture.node.port.postMessage("flush");
      } else if (this.socket && this.socket.readyState === WebSocket.CONNECTING) {
        // The audio so far goes once the server says hello.
        setState("finishing", "Finishing: waiting for the server\u2026");
      } else {
        this.release();
        setState("idle", "Stopped.");
      }
    }

    closed(event) {
      this.release();
      if (this.finished || this.failed) {
        return;
      }
      if (event.code === 1008) {
        // The server's error says what was wrong with the token.
        let why = this.lastError || event.reason || "";
        why = /^authentication/i.test(why)
          ? why.charAt(0).toUpperCase() + why.slice(1)
          : "Authentication failed: " + (why || "the server refused the token");
        this.fail(why + ". Enter the server's token and press Start again.");
      } else if (this.lastError) {
        this.fail(serverError(this.lastError));
      } else if (!this.opened) {
        this.fail("Could not connect to the server at " + displayUrl() +
          ": it is not reachable, or it refused the connection.");
      } else {
        this.fail("The connection to the server was lost before the final result" +
          " (close code " + event.code + (event.reason ? ": " + event.reason : "") + ").");
      }
    }

    fail(text) {
      this.failed = true;
      showError(text);
      setState("error", "Stopped by an error.");
      this.release();
    }

    stopMicrophone() {
      if (this.media) {
        this.media.getTracks().forEach((track) => track.stop());
      }
    }

    closeAudio() {
      this.stopMicrophone();
      if (this.capture && this.capture.context.state !== "closed") {
        this.capture.context.close();
      }
      showLevel(0);
    }

    // Done with this stream, for whatever reason.
    release() {
      this.closeAudio();
      if (this.socket && (this.socket.readyState === WebSocket.OPEN ||
                          this.socket.readyState === WebSocket.CONNECTING)) {
        this.socket.close(1000);
      }
    }
  }

  function serverError(text) {
    if (text === "No free streaming state available.") {
      return "The server is full: all of its streams are taken. Try again in a moment.";
    }
    return "The server says: " + text;
  }

  function displayUrl() {
    try {
      return serverBase().toString();
    } catch (error) {
      return params.get("server") || "(none)";
    }
  }

  // Wiring.

  let session = null;

  ui.start.addEventListener("click", () => {
    hideError();
    showSent(0);
    session = new Session(ui.token.value.trim());
    session.start();
  });

  ui.stop.addEventListener("click", () => {
    if (session) {
      session.stop();
    }
  });

  ui.clear.addEventListener("click", () => {
    ui.utterances.textContent = "";
    ui.partial.textContent = "";
    ui.empty.hidden = false;
    hideError();
  });

  ui.token.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !ui.start.disabled) {
      ui.start.click();
    }
  });

  ui.serverUrl.textContent = displayUrl();
  ui.partial.hidden = true;
  setState("idle");
  if (location.protocol === "file:" && !params.get("server")) {
    showError("Open this page from the server (http://HOST:PORT/ of its --http-port), " +
      "or say where the server is with ?server=ws://HOST:PORT.");
  } else if (!window.isSecureContext) {
    showError("This page is not a secure context, so the browser will not give it the " +
      "microphone: serve it over https://, or open it from localhost.");
  }
})();
