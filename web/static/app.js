(function () {
  "use strict";

  var JOBS_URL = "/api/v1/jobs";
  // Each poll is a long-poll: the server answers as soon as the job settles, or after WAIT_S
  // with the current status, so the page sees "done" at once and "running" within WAIT_S.
  var WAIT_S = 2;
  var POLL_FAST_MS = 50;
  var POLL_SLOW_MS = 1000;
  var SLOW_AFTER_MS = 20000;
  var MAX_POLL_ERRORS = 5;
  var UPLOAD_TIMEOUT_MS = 10 * 60 * 1000;
  var HISTORY_KEY = "imgsvc.history.v1";
  var MAX_HISTORY = 50;
  var TIMING_KEYS = ["queue", "decode", "preprocess", "inference", "gradcam", "render", "total"];
  var STATUS_TEXT = {
    uploading: "uploading",
    queued: "queued",
    running: "running",
    done: "done",
    failed: "failed",
    canceled: "canceled"
  };

  var controls = document.getElementById("controls");
  var fileInput = document.getElementById("file-input");
  var dropZone = document.getElementById("drop-zone");
  var urlForm = document.getElementById("url-form");
  var urlInput = document.getElementById("image-url");
  var modelSelect = document.getElementById("model-select");
  var topKInput = document.getElementById("top-k");
  var gradcamInput = document.getElementById("gradcam");
  var modelDescription = document.getElementById("model-description");
  var jobsList = document.getElementById("jobs");
  var announcer = document.getElementById("announcer");
  var clearButton = document.getElementById("clear-history");

  var cards = [];
  var maxUploadMb = Number(controls.getAttribute("data-max-upload-mb")) || 0;
  var maxUploadBytes = maxUploadMb * 1024 * 1024;

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function now() {
    return (window.performance && performance.now) ? performance.now() : Date.now();
  }

  function formatBytes(bytes) {
    if (bytes >= 1024 * 1024) {
      return (bytes / (1024 * 1024)).toFixed(1) + " MB";
    }
    if (bytes >= 1024) {
      return (bytes / 1024).toFixed(1) + " KB";
    }
    return bytes + " B";
  }

  function formatMs(value) {
    if (typeof value !== "number" || !isFinite(value)) {
      return "-";
    }
    return value.toFixed(1) + " ms";
  }

  function formatElapsed(ms) {
    if (ms >= 1000) {
      return (ms / 1000).toFixed(2) + " s";
    }
    return Math.round(ms) + " ms";
  }

  function formatPercent(score) {
    var n = Number(score);
    if (!isFinite(n)) {
      return "-";
    }
    return (n * 100).toFixed(1) + "%";
  }

  function readOptions() {
    var topK = parseInt(topKInput.value, 10);
    if (!isFinite(topK)) {
      topK = 5;
    }
    topK = Math.min(20, Math.max(1, topK));
    topKInput.value = String(topK);
    return {
      model: modelSelect.value,
      topK: topK,
      gradcam: gradcamInput.checked
    };
  }

  function updateModelDescription() {
    var option = modelSelect.options[modelSelect.selectedIndex];
    if (!option) {
      modelDescription.textContent = "";
      return;
    }
    var parts = [];
    if (option.title) {
      parts.push(option.title);
    }
    var size = option.getAttribute("data-input-size");
    if (size) {
      parts.push("input size " + size);
    }
    modelDescription.textContent = parts.join(" \u2014 ");
  }

  // A card is one upload (``file`` set) or one job remembered from an earlier visit (``entry`` set:
  // no file, so its heatmap is the server's PNG).
  function Card(file, options, entry) {
    this.file = file;
    this.options = options;
    this.name = file ? (file.name || "(unnamed file)") : (entry.name || "(unnamed file)");
    this.size = file ? file.size : entry.size;
    this.jobId = null;
    this.status = null;
    this.startedAt = now();
    this.pollStartedAt = null;
    this.pollErrors = 0;
    this.pollTimer = null;
    this.finished = false;
    this.thumbUrl = null;
    this.cleared = false;
    this.build();
    cards.push(this);
  }

  Card.prototype.build = function () {
    var root = el("li", "job");
    var header = el("div", "job-header");
    var name = el("span", "file-name", this.name);
    name.title = this.name;
    var badges = el("span", "badges");
    this.statusBadge = el("span", "badge status");
    this.cacheBadge = el("span", "badge");
    this.cacheBadge.hidden = true;
    badges.appendChild(this.cacheBadge);
    badges.appendChild(this.statusBadge);
    // Shown while the job is queued or running: POST .../cancel ends it "canceled".
    this.cancelButton = el("button", "cancel-job", "Cancel");
    this.cancelButton.type = "button";
    this.cancelButton.hidden = true;
    this.cancelButton.setAttribute("aria-label", "Cancel the job of " + this.name);
    this.cancelButton.addEventListener("click", this.cancel.bind(this));
    badges.appendChild(this.cancelButton);
    header.appendChild(name);
    header.appendChild(badges);
    root.appendChild(header);

    var media = el("div", "media");
    if (this.file) {
      var thumb = el("img", "thumb");
      thumb.alt = "Preview of " + this.name;
      try {
        this.thumbUrl = URL.createObjectURL(this.file);
        thumb.src = this.thumbUrl;
      } catch (e) {
        thumb.hidden = true;
      }
      thumb.addEventListener("error", function () {
        thumb.hidden = true;
      });
      media.appendChild(thumb);
    }
    this.media = media;
    root.appendChild(media);

    var opts = this.options;
    var meta = el("p", "meta",
      (typeof this.size === "number" ? formatBytes(this.size) + " \u00b7 " : "") + opts.model +
      " \u00b7 top " + opts.topK + " \u00b7 GradCAM " + (opts.gradcam ? "on" : "off"));
    root.appendChild(meta);

    this.progressBox = el("div", "upload-progress");
    this.progressBox.hidden = true;
    this.progressBar = el("progress");
    this.progressBar.max = 100;
    this.progressBar.value = 0;
    this.progressBar.setAttribute("aria-label", "Upload of " + this.name);
    this.progressText = el("span", "progress-text");
    this.progressBox.appendChild(this.progressBar);
    this.progressBox.appendChild(this.progressText);
    root.appendChild(this.progressBox);

    this.elapsedNode = el("p", "elapsed");
    root.appendChild(this.elapsedNode);

    this.body = el("div", "job-body");
    root.appendChild(this.body);

    this.root = root;
  };

  Card.prototype.setStatus = function (status) {
    var text = STATUS_TEXT[status] || String(status);
    if (this.status !== status) {
      announce(this.name + ": " + text);
    }
    this.status = status;
    this.cancelButton.hidden = !(this.jobId !== null && (status === "queued" || status === "running"));
    this.root.setAttribute("data-status", text);
    this.statusBadge.textContent = text;
    this.statusBadge.className = "badge status status-" + text.replace(/[^a-z]/g, "");
  };

  Card.prototype.setJobId = function (id) {
    this.jobId = String(id);
    this.root.setAttribute("data-job-id", this.jobId);
  };

  Card.prototype.updateElapsed = function (final) {
    if (!this.file) {
      this.elapsedNode.textContent = "From an earlier visit";
      return;
    }
    var ms = now() - this.startedAt;
    this.elapsedNode.textContent = (final ? "Wall time (browser): " : "Elapsed: ") + formatElapsed(ms);
  };

  Card.prototype.showProgress = function (loaded, total) {
    var percent = total > 0 ? Math.floor((loaded / total) * 100) : 0;
    this.progressBox.hidden = false;
    this.progressBar.value = percent;
    this.updateElapsed(false);
    this.progressText.textContent = "Uploading " + percent + "% (" + formatBytes(loaded) + " of " +
      formatBytes(total) + ")";
  };

  Card.prototype.fail = function (code, message, hint) {
    if (this.status !== null) {
      this.updateElapsed(true);
    }
    this.finished = true;
    this.stopPolling();
    this.progressBox.hidden = true;
    this.setStatus("failed");
    this.body.textContent = "";
    var box = el("div", "error");
    box.setAttribute("role", "alert");
    box.appendChild(el("span", "error-code", code || "unknown_error"));
    box.appendChild(el("span", "error-message", message || "The job failed."));
    if (hint) {
      box.appendChild(el("span", "error-hint", hint));
    }
    this.body.appendChild(box);
  };

  Card.prototype.stopPolling = function () {
    if (this.pollTimer !== null) {
      clearTimeout(this.pollTimer);
      this.pollTimer = null;
    }
  };

  Card.prototype.applyJob = function (job) {
    if (this.finished) {
      return;
    }
    if (job.id !== undefined && job.id !== null && this.jobId === null) {
      this.setJobId(job.id);
    }
    var status = job.status;
    if (status === "done") {
      this.finished = true;
      this.stopPolling();
      this.setStatus("done");
      this.updateElapsed(true);
      this.renderDone(job);
    } else if (status === "failed") {
      var err = job.error || {};
      this.fail(err.code, err.message);
    } else if (status === "canceled") {
      this.finished = true;
      this.stopPolling();
      this.setStatus("canceled");
      this.updateElapsed(true);
      this.body.textContent = "";
      this.body.appendChild(el("p", "canceled-note", "Canceled: this job will not be computed for you."));
    } else if (status === "queued" || status === "running") {
      this.setStatus(status);
      this.updateElapsed(false);
    } else {
      this.fail("bad_response", "Unexpected job status: " + String(status));
    }
  };

  Card.prototype.renderDone = function (job) {
    var result = job.result || {};
    this.body.textContent = "";

    this.cacheBadge.hidden = false;
    if (job.cached) {
      this.cacheBadge.className = "badge cached";
      this.cacheBadge.textContent = "from cache";
    } else {
      this.cacheBadge.className = "badge computed";
      this.cacheBadge.textContent = "computed";
    }

    var predictions = Array.isArray(result.predictions) ? result.predictions : [];
    var list = el("ol", "predictions");
    predictions.forEach(function (p) {
      var item = el("li");
      var score = Number(p.score);
      var width = isFinite(score) ? Math.min(1, Math.max(0, score)) * 100 : 0;
      var label = el("span", "label", p.label !== undefined ? p.label : "#" + p.index);
      if (p.index !== undefined && p.index !== null) {
        label.title = "class index " + p.index;
      }
      var bar = el("span", "bar");
      var fill = el("span", "bar-fill");
      fill.style.width = width.toFixed(1) + "%";
      bar.appendChild(fill);
      item.appendChild(label);
      item.appendChild(bar);
      item.appendChild(el("span", "score", formatPercent(p.score)));
      list.appendChild(item);
    });
    if (predictions.length === 0) {
      this.body.appendChild(el("p", "empty", "No predictions returned."));
    } else {
      this.body.appendChild(list);
    }

    if (result.gradcam && result.gradcam.url) {
      this.body.appendChild(this.heatmapFigure(job, result.gradcam));
    }

    var info = el("dl", "info");
    function addInfo(term, value) {
      info.appendChild(el("dt", null, term));
      info.appendChild(el("dd", null, value));
    }
    var image = job.image || {};
    var model = job.model || {};
    addInfo("Model", [model.name, model.version].filter(Boolean).join(" ") || "-");
    addInfo("Device", result.device || "-");
    addInfo("Format", image.format || "-");
    addInfo("Size", (image.width && image.height) ? image.width + " \u00d7 " + image.height : "-");
    if (image.sha256) {
      var shaNode = el("dd", "sha", String(image.sha256).slice(0, 12));
      shaNode.title = String(image.sha256);
      info.appendChild(el("dt", null, "SHA-256"));
      info.appendChild(shaNode);
    }
    this.body.appendChild(info);

    var timings = result.timings_ms;
    if (timings && typeof timings === "object") {
      var table = el("table", "timings");
      var caption2 = el("caption", null, "Server timings");
      table.appendChild(caption2);
      var tbody = el("tbody");
      var keys = TIMING_KEYS.slice();
      Object.keys(timings).forEach(function (k) {
        if (keys.indexOf(k) === -1) {
          keys.splice(keys.length - 1, 0, k);
        }
      });
      keys.forEach(function (k) {
        if (!(k in timings)) {
          return;
        }
        var row = el("tr", k === "total" ? "total" : null);
        row.appendChild(el("th", null, k));
        row.appendChild(el("td", null, formatMs(timings[k])));
        tbody.appendChild(row);
      });
      table.appendChild(tbody);
      this.body.appendChild(table);
    }
  };

  // The heatmap: drawn here from the result's map over the picture the user chose (the worker
  // draws nothing); the server's gradcam.png when the map or the picture is missing.
  Card.prototype.heatmapFigure = function (job, gradcam) {
    var figure = el("figure", "gradcam");
    var label = gradcam.label || (gradcam.class_index !== undefined ? "class " + gradcam.class_index : "its top class");
    var links = el("p", "links");
    var png = el("a", null, "heatmap PNG");
    png.href = String(gradcam.url);
    var json = el("a", null, "job JSON");
    json.href = "/api/v1/jobs/" + encodeURIComponent(job.id);
    links.appendChild(png);
    links.appendChild(document.createTextNode(" \u00b7 "));
    links.appendChild(json);
    var map = Array.isArray(gradcam.map) && gradcam.map.length ? gradcam.map : null;
    var box = Array.isArray(gradcam.crop_box) && gradcam.crop_box.length === 4 ? gradcam.crop_box : null;
    if (!map || !box || !this.thumbUrl) {
      var img = el("img", "overlay");
      img.src = String(gradcam.url);
      img.alt = "GradCAM heatmap: why it is " + label;
      figure.appendChild(img);
    } else {
      var canvas = el("canvas", "heatmap");
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", "GradCAM heatmap: why it is " + label);
      figure.appendChild(canvas);
      var slider = el("input", "opacity");
      slider.type = "range";
      slider.min = "0";
      slider.max = "1";
      slider.step = "0.05";
      slider.value = "0.5";
      slider.id = "opacity-" + job.id;
      var sliderLabel = el("label", "opacity-label", "Heatmap opacity");
      sliderLabel.htmlFor = slider.id;
      var controls = el("div", "heatmap-controls");
      controls.appendChild(sliderLabel);
      controls.appendChild(slider);
      figure.appendChild(controls);
      var picture = new Image();
      var redraw = function () { drawHeatmap(canvas, picture, map, box, Number(slider.value)); };
      picture.onload = redraw;
      slider.addEventListener("input", redraw);
      picture.src = this.thumbUrl;
    }
    figure.appendChild(el("figcaption", null, "Heatmap: why it is \u201c" + label + "\u201d"));
    figure.appendChild(links);
    return figure;
  };

  var JET = (function () {
    var lut = new Uint8ClampedArray(256 * 3);
    for (var i = 0; i < 256; i++) {
      var x = i / 255;
      lut[i * 3] = 255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - 3)));
      lut[i * 3 + 1] = 255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - 2)));
      lut[i * 3 + 2] = 255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - 1)));
    }
    return lut;
  })();
  var MAX_HEATMAP_SIDE = 768;
  var DIM = 0.45;  // as the server's PNG: what the model's centre crop did not see is dimmed

  // Draw the picture, dim it outside the crop box, and blend the map (bilinear, jet colours) over
  // the box at ``opacity``. The same look as the server's gradcam.png.
  function drawHeatmap(canvas, picture, map, box, opacity) {
    var scale = Math.min(1, MAX_HEATMAP_SIDE / Math.max(picture.naturalWidth, picture.naturalHeight));
    var width = Math.max(1, Math.round(picture.naturalWidth * scale));
    var height = Math.max(1, Math.round(picture.naturalHeight * scale));
    canvas.width = width;
    canvas.height = height;
    var ctx = canvas.getContext("2d");
    ctx.drawImage(picture, 0, 0, width, height);
    var left = Math.round(box[0] * width), top = Math.round(box[1] * height);
    var right = Math.max(left + 1, Math.round(box[2] * width));
    var bottom = Math.max(top + 1, Math.round(box[3] * height));
    var image = ctx.getImageData(0, 0, width, height);
    var px = image.data, rows = map.length, cols = map[0].length;
    var boxW = right - left, boxH = bottom - top;
    for (var y = 0; y < height; y++) {
      for (var x = 0; x < width; x++) {
        var o = (y * width + x) * 4;
        if (x < left || x >= right || y < top || y >= bottom) {
          px[o] *= DIM; px[o + 1] *= DIM; px[o + 2] *= DIM;
          continue;
        }
        // bilinear sample of the map at this pixel's centre (pixel centres aligned, edges clamped)
        var fy = Math.min(rows - 1, Math.max(0, ((y - top + 0.5) / boxH) * rows - 0.5));
        var fx = Math.min(cols - 1, Math.max(0, ((x - left + 0.5) / boxW) * cols - 0.5));
        var y0 = Math.floor(fy), x0 = Math.floor(fx);
        var y1 = Math.min(rows - 1, y0 + 1), x1 = Math.min(cols - 1, x0 + 1);
        var dy = fy - y0, dx = fx - x0;
        var v = (map[y0][x0] * (1 - dx) + map[y0][x1] * dx) * (1 - dy) +
                (map[y1][x0] * (1 - dx) + map[y1][x1] * dx) * dy;
        var level = Math.min(255, Math.max(0, Math.floor(v * 255))) * 3;
        px[o] += (JET[level] - px[o]) * opacity;
        px[o + 1] += (JET[level + 1] - px[o + 1]) * opacity;
        px[o + 2] += (JET[level + 2] - px[o + 2]) * opacity;
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  Card.prototype.schedulePoll = function (delayMs) {
    if (this.finished) {
      return;
    }
    if (this.pollStartedAt === null) {
      this.pollStartedAt = now();
    }
    var delay = (now() - this.pollStartedAt) > SLOW_AFTER_MS ? POLL_SLOW_MS : POLL_FAST_MS;
    if (delayMs !== undefined) {
      delay = Math.max(delay, delayMs);
    }
    var self = this;
    this.pollTimer = setTimeout(function () {
      self.pollTimer = null;
      self.poll();
    }, delay);
  };

  Card.prototype.pollFailed = function (code, message) {
    this.pollErrors += 1;
    if (this.pollErrors >= MAX_POLL_ERRORS) {
      this.fail(code, message + " (gave up after " + this.pollErrors + " attempts)");
    } else {
      this.schedulePoll();
    }
  };

  Card.prototype.poll = function () {
    var self = this;
    if (self.finished) {
      return;
    }
    var url = JOBS_URL + "/" + encodeURIComponent(self.jobId) + "?wait=" + WAIT_S;
    fetch(url, { headers: { "Accept": "application/json" }, cache: "no-store" })
      .then(function (response) {
        return readBody(response).then(function (body) {
          if (self.finished) {
            return;
          }
          if (response.ok) {
            if (!body.json || typeof body.json !== "object") {
              self.pollFailed("bad_response", "Server returned a non-JSON response while polling.");
              return;
            }
            self.pollErrors = 0;
            self.applyJob(body.json);
            // Wait-Skipped: the server's long-poll slots are taken; poll again after Retry-After
            var skipped = response.headers.get("Wait-Skipped");
            var retryS = parseInt(response.headers.get("Retry-After") || "1", 10);
            self.schedulePoll(skipped ? (isNaN(retryS) ? 1 : retryS) * 1000 : undefined);
            return;
          }
          var err = describeError(response.status, body, response.headers.get("Retry-After"));
          if (response.status >= 500 || response.status === 429) {
            self.pollFailed(err.code, err.message);
          } else {
            if (response.status === 404) {
              forget(self.jobId);
            }
            self.fail(err.code, err.message, err.hint);
          }
        });
      })
      .catch(function (error) {
        if (self.finished) {
          return;
        }
        self.pollFailed("network_error", "Could not reach the server: " + (error && error.message ? error.message : "request failed"));
      });
  };

  // Cancel the job; a job that settled meanwhile (409 already_settled) is shown as it settled.
  Card.prototype.cancel = function () {
    var self = this;
    if (self.finished || self.jobId === null) {
      return;
    }
    self.cancelButton.disabled = true;
    fetch(JOBS_URL + "/" + encodeURIComponent(self.jobId) + "/cancel",
          { method: "POST", headers: { "Accept": "application/json" }, cache: "no-store" })
      .then(function (response) {
        return readBody(response).then(function (body) {
          self.cancelButton.disabled = false;
          if (response.ok && body.json && typeof body.json === "object") {
            self.applyJob(body.json);
          } else if (response.status === 409) {
            self.stopPolling();
            self.poll();
          } else {
            var err = describeError(response.status, body, response.headers.get("Retry-After"));
            announce(self.name + ": could not cancel: " + err.message);
          }
        });
      })
      .catch(function () {
        self.cancelButton.disabled = false;
        announce(self.name + ": could not cancel: the server did not answer.");
      });
  };

  // XMLHttpRequest rather than fetch: only it reports upload progress.
  Card.prototype.upload = function () {
    var self = this;
    var form = new FormData();
    form.append("image", self.file, self.file.name);
    form.append("model", self.options.model);
    form.append("top_k", String(self.options.topK));
    form.append("gradcam", self.options.gradcam ? "true" : "false");

    self.setStatus("uploading");
    self.startedAt = now();
    self.updateElapsed(false);

    var xhr = new XMLHttpRequest();
    xhr.open("POST", JOBS_URL);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (event) {
      if (event.lengthComputable) {
        self.showProgress(event.loaded, event.total);
      }
    });
    xhr.upload.addEventListener("load", function () {
      self.progressText.textContent = "Uploaded " + formatBytes(self.file.size) + "; waiting for the server";
    });
    xhr.addEventListener("load", function () {
      self.progressBox.hidden = true;
      self.accepted(xhr.status, parseBody(xhr.responseText), xhr.getResponseHeader("Retry-After"));
    });
    xhr.addEventListener("error", function () {
      self.fail("network_error", "Upload failed: the connection to the server was lost.");
    });
    xhr.addEventListener("timeout", function () {
      self.fail("network_error", "Upload failed: the server did not answer in time.");
    });
    xhr.timeout = UPLOAD_TIMEOUT_MS;
    xhr.send(form);
  };

  // The answer to a submit: a job to follow until it settles, or a refusal to show.
  Card.prototype.accepted = function (status, body, retryAfter) {
    if (status < 200 || status >= 300) {
      var err = describeError(status, body, retryAfter);
      this.fail(err.code, err.message, err.hint);
      return;
    }
    var job = body.json;
    if (!job || typeof job !== "object" || job.id === undefined || job.id === null) {
      this.fail("bad_response", "Server did not return a job.");
      return;
    }
    this.setJobId(job.id);
    remember(this);
    this.applyJob(job);
    this.schedulePoll();
  };

  // An image by its address: the server fetches it (the job is queued meanwhile).
  Card.prototype.submitUrl = function (url) {
    var self = this;
    self.setStatus("uploading");
    self.startedAt = now();
    fetch(JOBS_URL, {
      method: "POST", cache: "no-store",
      headers: { "Accept": "application/json", "Content-Type": "application/json" },
      body: JSON.stringify({ image_url: url, model: self.options.model, top_k: self.options.topK,
                             gradcam: self.options.gradcam })
    }).then(function (response) {
      return readBody(response).then(function (body) {
        self.accepted(response.status, body, response.headers.get("Retry-After"));
      });
    }).catch(function () {
      self.fail("network_error", "The request failed: the connection to the server was lost.");
    });
  };

  // Show a remembered job: fetch it once, then poll like a fresh upload until it settles.
  Card.prototype.restore = function (id) {
    this.setJobId(id);
    this.setStatus("queued");
    this.poll();
  };

  function parseBody(text) {
    var json = null;
    if (text) {
      try {
        json = JSON.parse(text);
      } catch (e) {
        json = null;
      }
    }
    return { text: text || "", json: json };
  }

  function readBody(response) {
    return response.text().then(parseBody, function () {
      return { text: "", json: null };
    });
  }

  // What a refusal means to the user, and when to try again (the server's Retry-After, in seconds).
  var REFUSAL_HINTS = {
    413: "The file is too large for this service.",
    415: "This file is not an image the service reads (JPEG, PNG, GIF, WebP, BMP, TIFF).",
    429: "Too many requests from you right now.",
    503: "The service is busy or unavailable right now."
  };

  function describeError(status, body, retryAfter) {
    var err = body.json && typeof body.json === "object" ? body.json.error : null;
    var code, message;
    if (err && typeof err === "object") {
      code = err.code ? String(err.code) : "http_" + status;
      message = err.message ? String(err.message) : "HTTP " + status;
    } else {
      code = "http_" + status;
      message = "HTTP " + status;
      var snippet = (body.text || "").replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
      if (snippet) {
        message += ": " + (snippet.length > 160 ? snippet.slice(0, 160) + "\u2026" : snippet);
      }
    }
    var hint = REFUSAL_HINTS[status] || "";
    var seconds = parseInt(retryAfter, 10);
    if ((status === 429 || status === 503) && isFinite(seconds)) {
      hint += " The server asks to retry in " + seconds + (seconds === 1 ? " second." : " seconds.");
    }
    return { code: code, message: message, hint: hint };
  }

  // History: the ids of this browser's jobs, newest first, kept in localStorage across reloads.
  function loadHistory() {
    try {
      var entries = JSON.parse(window.localStorage.getItem(HISTORY_KEY) || "[]");
      return Array.isArray(entries) ? entries.filter(function (e) { return e && e.id; }) : [];
    } catch (e) {
      return [];
    }
  }

  function saveHistory(entries) {
    try {
      window.localStorage.setItem(HISTORY_KEY, JSON.stringify(entries.slice(0, MAX_HISTORY)));
    } catch (e) {
      // Storage full or disabled (private mode): the page still works, it just forgets on reload.
    }
    clearButton.hidden = entries.length === 0;
  }

  function remember(card) {
    if (card.cleared) {
      return;
    }
    var entries = loadHistory().filter(function (e) { return e.id !== card.jobId; });
    entries.unshift({ id: card.jobId, name: card.name, size: card.size, model: card.options.model,
                      topK: card.options.topK, gradcam: card.options.gradcam });
    saveHistory(entries);
  }

  function forget(id) {
    saveHistory(loadHistory().filter(function (e) { return e.id !== id; }));
  }

  function restoreHistory() {
    var entries = loadHistory();
    entries.forEach(function (entry) {
      var card = new Card(null, { model: entry.model, topK: entry.topK, gradcam: entry.gradcam }, entry);
      jobsList.appendChild(card.root);
      card.restore(entry.id);
    });
    clearButton.hidden = entries.length === 0;
    if (entries.length) {
      announce("Showing " + entries.length + " earlier job" + (entries.length === 1 ? "" : "s") + ".");
    }
  }

  function clearHistory() {
    saveHistory([]);
    cards.forEach(function (card) {
      card.cleared = true;  // an upload still in flight must not come back into the history
      card.finished = true;
      card.stopPolling();
    });
    cards = [];
    Array.prototype.slice.call(jobsList.children).forEach(function (node) {
      jobsList.removeChild(node);
    });
    announce("History cleared.");
  }

  var announceTimer = null;
  // Screen readers hear status changes through one polite live region, one message at a time.
  function announce(text) {
    var pending = announcer.getAttribute("data-pending");
    announcer.setAttribute("data-pending", pending ? pending + " " + text : text);
    if (announceTimer === null) {
      announceTimer = setTimeout(function () {
        announceTimer = null;
        announcer.textContent = announcer.getAttribute("data-pending");
        announcer.removeAttribute("data-pending");
      }, 250);
    }
  }

  function addFiles(fileList) {
    var files = Array.prototype.slice.call(fileList || []);
    if (files.length === 0) {
      return;
    }
    var options = readOptions();
    files.forEach(function (file) {
      var card = new Card(file, options, null);
      jobsList.insertBefore(card.root, jobsList.firstChild);
      if (maxUploadBytes > 0 && file.size > maxUploadBytes) {
        card.fail("payload_too_large",
          "File is " + formatBytes(file.size) + "; the limit is " + maxUploadMb + " MB. It was not uploaded.",
          REFUSAL_HINTS[413]);
        return;
      }
      card.upload();
    });
  }

  urlForm.addEventListener("submit", function (event) {
    event.preventDefault();
    var url = urlInput.value.trim();
    if (!url) {
      return;
    }
    var card = new Card(null, readOptions(), { name: url });
    jobsList.insertBefore(card.root, jobsList.firstChild);
    card.submitUrl(url);
    urlInput.value = "";
  });

  fileInput.addEventListener("change", function () {
    addFiles(fileInput.files);
    fileInput.value = "";
  });

  // The drop zone is a button: Enter, Space or a click opens the file chooser.
  dropZone.addEventListener("click", function () {
    fileInput.click();
  });
  clearButton.addEventListener("click", clearHistory);

  var dragDepth = 0;
  dropZone.addEventListener("dragenter", function (event) {
    event.preventDefault();
    dragDepth += 1;
    dropZone.classList.add("dragover");
  });
  dropZone.addEventListener("dragover", function (event) {
    event.preventDefault();
    if (event.dataTransfer) {
      event.dataTransfer.dropEffect = "copy";
    }
  });
  dropZone.addEventListener("dragleave", function () {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) {
      dropZone.classList.remove("dragover");
    }
  });
  dropZone.addEventListener("drop", function (event) {
    event.preventDefault();
    dragDepth = 0;
    dropZone.classList.remove("dragover");
    if (event.dataTransfer) {
      addFiles(event.dataTransfer.files);
    }
  });

  // Keep a file dropped outside the drop zone from replacing the page.
  window.addEventListener("dragover", function (event) {
    event.preventDefault();
  });
  window.addEventListener("drop", function (event) {
    event.preventDefault();
  });

  modelSelect.addEventListener("change", updateModelDescription);
  updateModelDescription();
  restoreHistory();
})();
