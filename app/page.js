() => {
  // What Gradio's components leave to the page: following the conversation only while the reader
  // is at its end, names for pictures and the message box, files dropped outside the message box,
  // and copying the conversation as plain text.
  const AT_END_PX = 8;           // this close to the end counts as reading the newest message
  const state = {follow: true, sent: false, log: null};

  const chatLog = () => document.querySelector('#chat [role=log]');
  const atEnd = log => log.scrollHeight - log.scrollTop - log.clientHeight <= AT_END_PX;
  const toEnd = log => { log.scrollTop = log.scrollHeight; };

  // ---- following the newest message ------------------------------------------------------------
  function watchLog(log) {
    state.log = log;
    state.follow = true;
    let pointerDown = false, touching = false;
    const readerMovedUp = () => { if (!atEnd(log)) state.follow = false; };
    log.addEventListener('wheel', event => { if (event.deltaY < 0) state.follow = false; }, {passive: true});
    log.addEventListener('touchstart', () => { touching = true; }, {passive: true});
    log.addEventListener('touchend', () => { touching = false; }, {passive: true});
    log.addEventListener('pointerdown', () => { pointerDown = true; });  // the scroll bar, dragged
    window.addEventListener('pointerup', () => { pointerDown = false; });
    log.addEventListener('keydown', event => {
      if (['ArrowUp', 'PageUp', 'Home'].includes(event.key) || (event.key === ' ' && event.shiftKey)) {
        state.follow = false;
      }
    });
    let lastTop = log.scrollTop;
    log.addEventListener('scroll', () => {
      if (atEnd(log)) state.follow = true;
      else if ((pointerDown || touching) && log.scrollTop < lastTop) readerMovedUp();
      lastTop = log.scrollTop;
    }, {passive: true});
    new ResizeObserver(() => { if (state.follow) toEnd(log); }).observe(log);
  }

  function onChatChange() {
    const log = chatLog();
    if (!log) return;
    if (log !== state.log) watchLog(log);
    const wrap = log.querySelector('.message-wrap');
    if (wrap && !wrap.dataset.watched) {
      wrap.dataset.watched = '1';
      new ResizeObserver(() => { if (state.follow) toEnd(log); }).observe(wrap);
    }
    if (state.sent && log.querySelector('.user-row')) {  // the question just sent is shown
      state.sent = false;
      bringChatIntoView();
    }
    makeRoomForNotices(log);
    if (state.follow) toEnd(log);
    nameThings();
    focusMessageBox();
  }

  // Sending (or asking again) means reading the newest message: follow it again.
  const sending = () => {
    state.follow = true;
    state.sent = true;
    const notice = document.querySelector('#picture-notice');
    if (notice) notice.textContent = '';
  };
  document.addEventListener('click', event => {
    if (event.target.closest && event.target.closest('#message .submit-button, #chat .example, #retry')) sending();
  }, true);
  document.addEventListener('keydown', event => {
    if (event.key === 'Enter' && !event.shiftKey && event.target.matches && event.target.matches('#message textarea')) {
      sending();
    }
  }, true);

  // On a phone the page itself scrolls: after sending, the end of the chat must be on screen just
  // above the message box (which stays at the bottom), not the examples or the picture card.
  function bringChatIntoView() {
    const chat = document.querySelector('#chat'), box = document.querySelector('#message');
    if (!chat || !box) return;
    const hidden = chat.getBoundingClientRect().bottom - (window.innerHeight - box.getBoundingClientRect().height);
    if (hidden > 0) window.scrollBy(0, hidden + 4);
  }

  // On a phone a notice (a toast) shows just above the message box, where the newest message would
  // be: the end of the chat gets that much room, so following the conversation keeps the newest
  // message above the notice rather than under it.
  // (Set here, not in the page's CSS: Gradio scopes that CSS to the layout, which the notices are outside.)
  const phone = window.matchMedia('(max-width: 640px)');
  function makeRoomForNotices(log) {
    const root = document.documentElement.style;
    const box = document.querySelector('#message'), notices = document.querySelector('.toast-wrap');
    if (!notices) return;
    const onPhone = phone.matches;
    notices.style.setProperty('top', onPhone ? 'auto' : '', onPhone ? 'important' : '');
    const boxTop = box ? Math.min(box.getBoundingClientRect().top, window.innerHeight) : window.innerHeight;
    const bottom = onPhone ? `${Math.ceil(window.innerHeight - boxTop) + 8}px` : '';
    if (notices.style.bottom !== bottom) notices.style.bottom = bottom;
    const room = onPhone && notices.childElementCount ? Math.ceil(notices.getBoundingClientRect().height) + 8 : 0;
    if (root.getPropertyValue('--notices-height') !== `${room}px`) {
      root.setProperty('--notices-height', `${room}px`);
      if (state.follow) toEnd(log);
    }
  }

  // Gradio's outer box hides its overflow, which makes it a scrolling box: the message box could not
  // stick to the bottom of the screen inside it. Clipping hides the same overflow without that.
  const container = document.querySelector('.gradio-container');
  if (container) container.style.overflow = 'clip';

  // ---- names for assistive technology ----------------------------------------------------------
  // The message box takes the keyboard at once on a computer; on a touch screen it waits for a tap
  // (focusing it would open the on-screen keyboard and scroll the page away from its top).
  let focusedOnLoad = false;
  function focusMessageBox() {
    const textarea = document.querySelector('#message textarea');
    if (focusedOnLoad || !textarea) return;
    focusedOnLoad = true;
    if (window.matchMedia('(pointer: fine)').matches) textarea.focus({preventScroll: true});
  }

  function nameThings() {
    document.querySelectorAll('#chat img:not([alt]), #chat img[alt=""]').forEach(img => {
      img.alt = 'Picture sent with the question';
    });
    document.querySelectorAll('#active-picture img:not([alt]), #active-picture img[alt=""]').forEach(img => {
      img.alt = 'The picture the model sees now';
    });
    const textarea = document.querySelector('#message textarea');
    if (textarea && !textarea.getAttribute('aria-label')) textarea.setAttribute('aria-label', 'Message');
    const examples = document.querySelector('#chat .examples[role=list]');
    if (examples) {  // a list may only hold list items; these are buttons
      examples.setAttribute('role', 'group');
      examples.setAttribute('aria-label', 'Examples');
    }
    const empty = document.querySelector('#active-picture .empty:not([role])');
    if (empty) {
      empty.setAttribute('role', 'img');
      empty.setAttribute('aria-label', 'No picture yet');
    }
    // A toast's header is a button that holds its Close button; the header only folds the text.
    document.querySelectorAll('.toast-header[role=button]').forEach(header => {
      header.removeAttribute('role');
      header.removeAttribute('tabindex');
    });
    const down = document.querySelector('#chat .scroll-down-button-container button');
    if (down && down.getAttribute('aria-label') !== 'Jump to the latest message') {
      down.setAttribute('aria-label', 'Jump to the latest message');
      down.title = 'Jump to the latest message';
    }
  }

  // ---- pictures dropped or pasted -------------------------------------------------------------
  // Chromium opens an unhandled dropped file in the tab, and the conversation is lost: a picture
  // dropped anywhere on the page goes to the message box instead. A message holds one picture, and
  // Gradio's box ignores a second one: as in chat apps, the newest picture replaces the attached one
  // and the page says so under the message box.
  const carriesFiles = transfer => transfer && Array.from(transfer.types).includes('Files');
  const attached = () => document.querySelector('#message .thumbnail-item img');
  const fileName = img => decodeURIComponent(new URL(img.src).pathname.split('/').pop());

  function sayUnderMessageBox(text) {
    const box = document.querySelector('#message');
    if (!box) return;
    let notice = document.querySelector('#picture-notice');
    if (!notice) {
      notice = document.createElement('p');
      notice.id = 'picture-notice';
      notice.setAttribute('role', 'status');
      box.after(notice);
    }
    notice.textContent = text;
  }

  function attachPicture(files) {
    const file = files[0];
    const kept = attached();
    const notes = [];
    if (kept) notes.push(`${file.name} replaced ${fileName(kept)}.`);
    if (files.length > 1) notes.push(`${file.name} is attached, the first of the ${files.length} pictures.`);
    if (kept) kept.closest('.thumbnail-item').querySelector('.delete-button')?.click();
    // Gradio shows the file input again once the attached picture is gone.
    const put = () => {
      const input = document.querySelector('#message input[type=file]');
      if (!input) { requestAnimationFrame(put); return; }
      const chosen = new DataTransfer();
      chosen.items.add(file);
      input.files = chosen.files;
      input.dispatchEvent(new Event('change', {bubbles: true}));
      if (notes.length) sayUnderMessageBox(`A message takes one picture: ${notes.join(' ')}`);
    };
    put();
  }

  document.addEventListener('dragover', event => { if (carriesFiles(event.dataTransfer)) event.preventDefault(); });
  // Before Gradio's own handler (capture): a second picture, or several at once, even on the message box.
  document.addEventListener('drop', event => {
    if (!carriesFiles(event.dataTransfer) || !event.dataTransfer.files.length) return;
    const onBox = event.target.closest && event.target.closest('#message');
    if (onBox && !attached() && event.dataTransfer.files.length === 1) return;  // Gradio takes it
    event.preventDefault();
    event.stopPropagation();
    attachPicture(Array.from(event.dataTransfer.files));
  }, true);
  document.addEventListener('paste', event => {
    const files = event.clipboardData ? Array.from(event.clipboardData.files) : [];
    if (!files.length || !event.target.closest || !event.target.closest('#message')) return;
    if (!attached() && files.length === 1) return;  // Gradio takes it
    event.preventDefault();
    event.stopPropagation();
    attachPicture(files);
  }, true);
  // A picture chosen with the clip goes the usual way; the note about an earlier one is old news then.
  document.addEventListener('change', event => {
    if (event.isTrusted && event.target.matches && event.target.matches('#message input[type=file]')) {
      sayUnderMessageBox('');
    }
  }, true);

  // ---- copying the conversation ----------------------------------------------------------------
  const plain = html => {
    const holder = document.createElement('div');
    holder.innerHTML = html;
    holder.querySelectorAll('.oov-badge, .thread-badge').forEach(badge => badge.remove());
    return holder.textContent.trim();
  };
  window.mllamaConversationText = messages => {
    const lines = [];
    for (const message of messages || []) {
      if (message.metadata && message.metadata.title) continue;  // an answer's figures line
      const parts = Array.isArray(message.content) ? message.content : [message.content];
      const texts = [];
      for (const part of parts) {
        if (typeof part === 'string') texts.push(plain(part));
        else if (part && part.type === 'text') texts.push(plain(part.text));
        else if (part) texts.push('[picture]');
      }
      const text = texts.filter(Boolean).join('\n');
      if (text) lines.push(`${message.role === 'user' ? 'You' : 'Assistant'}: ${text}`);
    }
    return lines.join('\n\n');
  };
  // An answer and its figures line share a bubble, whose copy button would copy both: it copies the
  // answer's text alone.
  document.addEventListener('click', event => {
    const button = event.target.closest && event.target.closest('#chat .message-buttons button[aria-label="Copy message"]');
    const row = button && button.closest('.message-buttons').previousElementSibling;
    const answer = row && row.querySelector('.thought-group') && row.querySelector('.message:not(.thought) .message-content');
    if (!answer) return;
    event.stopPropagation();
    event.preventDefault();
    navigator.clipboard.writeText(answer.innerText.trim());
  }, true);
  window.mllamaCopyConversation = messages => {
    navigator.clipboard.writeText(window.mllamaConversationText(messages));
    return [];
  };

  // ---- focus -----------------------------------------------------------------------------------
  // After Stop, or after the file picker closed, typing goes on in the message box.
  document.addEventListener('click', event => {
    if (event.target.closest && event.target.closest('#message .stop-button')) {
      setTimeout(() => document.querySelector('#message textarea')?.focus(), 0);
    }
  }, true);
  document.addEventListener('change', event => {
    if (event.target.matches && event.target.matches('#message input[type=file]')) {
      document.querySelector('#message textarea')?.focus();
    }
  }, true);

  // Streaming changes the page many times a frame: look at it at most once a frame.
  let scheduled = false;
  const schedule = () => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; onChatChange(); });
  };
  new MutationObserver(schedule).observe(document.body, {childList: true, subtree: true, characterData: true});
  schedule();
}
