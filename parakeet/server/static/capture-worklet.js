// The microphone's samples, mixed to mono and converted to little-endian
// 16-bit PCM on the audio thread, handed to the page in pieces of
// processorOptions.chunkSeconds (0.1 s) at the AudioContext's own rate.
//
// Messages to the page:
//   {type: "audio", pcm: ArrayBuffer, peak: number}  one piece
//   {type: "flushed"}   answers "flush": every sample captured so far has
//                       been handed over, the last piece possibly shorter.

class PcmCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const seconds = (options.processorOptions || {}).chunkSeconds || 0.1;
    this.size = Math.max(128, Math.round(sampleRate * seconds));
    this.fresh();
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.send();
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  fresh() {
    this.buffer = new ArrayBuffer(this.size * 2);
    this.view = new DataView(this.buffer);
    this.filled = 0;
    this.peak = 0;
  }

  process(inputs) {
    const channels = inputs[0] || [];
    if (channels.length === 0) {
      return true;
    }
    const frames = channels[0].length;
    for (let i = 0; i < frames; i++) {
      let sample = 0;
      for (let c = 0; c < channels.length; c++) {
        sample += channels[c][i];
      }
      sample /= channels.length;
      const magnitude = Math.abs(sample);
      if (magnitude > this.peak) {
        this.peak = magnitude;
      }
      const clipped = Math.max(-1, Math.min(32767 / 32768, sample));
      this.view.setInt16(this.filled * 2, Math.round(clipped * 32768), true);
      this.filled += 1;
      if (this.filled === this.size) {
        this.send();
      }
    }
    return true;
  }

  send() {
    if (this.filled === 0) {
      return;
    }
    const pcm = this.buffer.slice(0, this.filled * 2);
    this.port.postMessage({ type: "audio", pcm, peak: this.peak }, [pcm]);
    this.fresh();
  }
}

registerProcessor("pcm-capture", PcmCapture);
