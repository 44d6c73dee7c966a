// The reference shop's browser client: plain JavaScript, no build step.
//
// It talks only to the gateway, with relative URLs, and to the services
// behind it: the catalog (browse, search), pricing (the live quote), orders
// (place, list, follow), accounts (sign up, sign in, tokens),
// notifications (the signed-in user's messages) and analytics (best
// sellers). Placing an order only starts the order saga: inventory reserves
// the stock and payments charges the card through events, so the page
// polls the order until it is confirmed or cancelled. Every error body
// has the platform's shape {"error": {"code", "message", "fields"?,
// "details"?}}, shown as is.
//
// A signed-in browser carries its access token in an HttpOnly cookie that
// the accounts service sets (`"session": "cookie"` at login): the gateway
// verifies it on order calls and an order belongs to the token's user, so
// ordering and "my orders" need a signed-in user.
'use strict';

(() => {
  const PAGE_SIZE = 12;
  const QUOTE_DELAY_MS = 250;
  // How often a placed order is polled while the saga runs, and for how
  // long before the page stops asking (the order still ends; "My orders"
  // shows it).
  const TRACK_EVERY_MS = 500;
  const TRACK_FOR_MS = 60_000;
  const BASKET_KEY = 'flotilla-shop-basket';
  const EMAIL_KEY = 'flotilla-shop-email';
  // Tokens. This page never sees one: both live in HttpOnly cookies the
  // accounts service sets, the access token (`shop_at`, sent to /api) and
  // the refresh token (`shop_rt`, sent to /api/accounts only, and only from
  // this site), so no script, a cross-site scripting bug's included, can
  // read them. The gateway takes the access token from its cookie and acts
  // on it for a request that changes something only when the request comes
  // from this site (its CSRF check). What the page can read is
  // `shop_session`: when the access token expires. It says whether there
  // is a session to resume on load, and whether another tab has refreshed
  // it (all tabs share the cookies, and a refresh token presented twice
  // ends the session: the server takes that for theft).
  const SESSION_COOKIE = 'shop_session';
  // Where an earlier version of this page kept the refresh token.
  const OLD_REFRESH_KEY = 'flotilla-shop-refresh';

  const $ = (id) => document.getElementById(id);

  const state = {
    q: '',
    category: '',
    offset: 0,
    total: 0,
    // Numbers each product list asked for: only the latest one's answer
    // is shown, whatever order the answers come back in.
    productsSeq: 0,
    basket: loadBasket(), // [{sku, name, unit_price_cents, currency, stock, quantity}]
    quote: null,
    // The quote request (JSON) that state.quote answers: an order is
    // placed only at the total quoted for the basket and coupon as they
    // are now, not as they were before the last change.
    quotedFor: null,
    quoteSeq: 0,
    quoteTimer: null,
    placing: false,
    // {body, key}: the Idempotency-Key of the order being placed, kept
    // until it is placed so that trying again after a lost answer cannot
    // place it twice; a changed order gets a new key.
    checkout: null,
    tracking: null, // the id of the order being followed
  };

  const auth = {
    signedIn: false,
    user: null, // {email, name?} for display, from /api/accounts/me
    refreshing: null, // the one refresh in flight, shared by all callers
  };

  // ---- HTTP ---------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, fields, details) {
      super(message);
      this.status = status;
      this.code = code;
      this.fields = fields || [];
      this.details = details || null;
    }
  }

  /**
   * Calls the shop (the browser sends the session's cookies). With
   * `{ auth: true }`, a 401 while there is a session is answered by
   * refreshing it once and retrying once.
   */
  async function api(method, url, body, options) {
    const withAuth = Boolean(options && options.auth);
    const headers = (options && options.headers) || {};
    const seen = sessionExpiry();
    try {
      return await request(method, url, body, headers);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401 || !withAuth || seen === null) throw err;
      if (!(await refreshSession(seen))) throw err;
      return request(method, url, body, headers);
    }
  }

  async function request(method, url, body, headers) {
    const init = { method, headers: { Accept: 'application/json', ...headers }, credentials: 'same-origin' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(url, init);
    } catch (_) {
      throw new ApiError(0, 'network_error', 'Could not reach the shop. Check your connection and try again.');
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    }
    if (!res.ok) {
      const err = data && data.error;
      if (err && typeof err.code === 'string') {
        throw new ApiError(res.status, err.code, err.message || res.statusText, err.fields, err.details);
      }
      throw new ApiError(res.status, `http_${res.status}`, `The shop answered ${res.status} ${res.statusText}.`.trim());
    }
    return data;
  }

  // ---- Rendering helpers --------------------------------------------------

  function money(cents, currency) {
    try {
      return new Intl.NumberFormat(undefined, { style: 'currency', currency: currency || 'EUR' }).format(cents / 100);
    } catch (_) {
      return `${(cents / 100).toFixed(2)} ${currency || ''}`.trim();
    }
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** Shows an ApiError (message plus field list) in `box`, or hides `box`. */
  function showError(box, err) {
    box.replaceChildren();
    if (!err) {
      box.hidden = true;
      return;
    }
    const message = err.message || 'Something went wrong.';
    box.append(el('div', {}, message));
    // A single field error is usually the message itself: list fields only
    // when they add something.
    const fields = (err.fields || []).map((f) => `${f.field}: ${f.message}`).filter((t) => t !== message);
    if (fields.length) {
      const list = el('ul');
      for (const text of fields) list.append(el('li', {}, text));
      box.append(list);
    }
    box.hidden = false;
  }

  function showOk(box, message) {
    box.replaceChildren();
    if (!message) {
      box.hidden = true;
      return;
    }
    box.append(el('div', {}, message));
    box.hidden = false;
  }

  // ---- Account ------------------------------------------------------------

  /**
   * When the session's access token expires (Unix seconds, from the
   * readable `shop_session` cookie), or null when there is no session.
   */
  function sessionExpiry() {
    for (const pair of document.cookie.split(';')) {
      const eq = pair.indexOf('=');
      if (eq > 0 && pair.slice(0, eq).trim() === SESSION_COOKIE) {
        const value = Number(pair.slice(eq + 1).trim());
        return Number.isFinite(value) && value > 0 ? value : null;
      }
    }
    return null;
  }

  /** Signed in: who it is comes from the accounts service. */
  async function startSession() {
    auth.signedIn = true;
    try {
      const me = await api('GET', 'api/accounts/me', undefined, { auth: true });
      auth.user = { email: me.email, name: me.name };
    } catch (err) {
      if (err.status === 401) {
        forgetSession();
        return;
      }
      // The name is for display only; the session stands.
    }
    renderAccount();
    loadNotifications();
  }

  function forgetSession() {
    auth.signedIn = false;
    auth.user = null;
    renderAccount();
  }

  /**
   * Swaps the refresh token (its cookie) for new tokens; resolves to
   * whether the page is signed in afterwards. `seen` is the session's
   * expiry when the call that needs it was refused. One refresh at a time
   * in this tab, and with the Web Locks API in all of them: two at once
   * would present the same refresh token twice. A tab that waited for
   * another's refresh sees a new expiry and just retries.
   */
  function refreshSession(seen) {
    if (auth.refreshing) return auth.refreshing;
    const run = async () => {
      const now = sessionExpiry();
      if (now === null) {
        forgetSession();
        return false;
      }
      if (now !== seen) return true; // another tab refreshed it
      try {
        await request('POST', 'api/accounts/refresh', {});
        return true;
      } catch (err) {
        // Refused (expired, revoked, reused): signed out, and the server
        // cleared the cookies. A network error or an outage keeps the
        // session for the next try.
        if (err.status === 400 || err.status === 401) {
          forgetSession();
          showError($('account-error'), new ApiError(err.status, err.code, 'Your session has ended. Please sign in again.'));
        }
        return false;
      }
    };
    const pending = navigator.locks ? navigator.locks.request('flotilla-shop-refresh', run) : run();
    auth.refreshing = pending;
    pending.then(() => {
      if (auth.refreshing === pending) auth.refreshing = null;
    });
    return pending;
  }

  async function withBusy(button, work) {
    button.disabled = true;
    try {
      await work();
    } finally {
      button.disabled = false;
    }
  }

  async function signIn(event) {
    event.preventDefault();
    if (!$('sign-in').reportValidity()) return;
    const email = $('si-email').value.trim();
    const password = $('si-password').value;
    showError($('account-error'), null);
    showOk($('account-ok'), null);
    await withBusy($('si-submit'), async () => {
      try {
        await request('POST', 'api/accounts/login', { email, password, session: 'cookie' });
        $('si-password').value = '';
        rememberEmail(email);
        await startSession();
      } catch (err) {
        showError($('account-error'), err);
      }
    });
  }

  async function signUp(event) {
    event.preventDefault();
    if (!$('sign-up').reportValidity()) return;
    const email = $('su-email').value.trim();
    const password = $('su-password').value;
    const body = { email, password };
    const name = $('su-name').value.trim();
    if (name) body.name = name;
    showError($('account-error'), null);
    showOk($('account-ok'), null);
    await withBusy($('su-submit'), async () => {
      try {
        await request('POST', 'api/accounts/register', body);
        await request('POST', 'api/accounts/login', { email, password, session: 'cookie' });
        $('su-password').value = '';
        rememberEmail(email);
        await startSession();
        showOk($('account-ok'), 'Welcome! Your account is ready and you are signed in.');
      } catch (err) {
        showError($('account-error'), err);
      }
    });
  }

  async function signOut() {
    forgetSession();
    showError($('account-error'), null);
    $('orders').replaceChildren();
    $('orders-empty').hidden = true;
    $('notifications').replaceChildren();
    $('notifications-empty').hidden = true;
    stopTracking();
    $('progress').hidden = true;
    showOk($('account-ok'), 'You are signed out.');
    try {
      // Revokes the refresh token (its cookie) and clears the cookies.
      await request('POST', 'api/accounts/logout', {});
    } catch (_) {
      // Signed out here regardless: the page forgets the session (the
      // tokens' cookies are out of its reach), which ends on the server
      // when its refresh token expires.
      document.cookie = `${SESSION_COOKIE}=; Max-Age=0; Path=/; SameSite=Strict`;
    }
  }

  function renderAccount() {
    const signedIn = auth.signedIn;
    const who = signedIn ? (auth.user && auth.user.email) || 'your account' : '';
    $('signed-in').hidden = !signedIn;
    $('signed-out').hidden = signedIn;
    $('who').textContent = who;
    // An order belongs to the token's user: there is no e-mail to type.
    $('email-field').hidden = true;
    $('email').required = false;
    $('ordering-as').hidden = false;
    $('ordering-as').textContent = signedIn ? `Ordering as ${who}.` : 'Sign in to place an order.';
  }

  function showTab(which) {
    const up = which === 'sign-up';
    $('sign-in').hidden = up;
    $('sign-up').hidden = !up;
    $('tab-sign-in').setAttribute('aria-selected', String(!up));
    $('tab-sign-up').setAttribute('aria-selected', String(up));
    showError($('account-error'), null);
    showOk($('account-ok'), null);
  }

  // ---- Catalog ------------------------------------------------------------

  async function loadCategories() {
    try {
      const page = await api('GET', 'api/catalog/products?limit=100');
      const categories = [...new Set(page.products.map((p) => p.category))].sort();
      const select = $('category');
      for (const c of categories) select.append(el('option', { value: c }, c));
    } catch (_) {
      // The product list below reports catalog problems; categories are optional.
    }
  }

  async function loadProducts() {
    const seq = ++state.productsSeq;
    const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.offset) });
    if (state.q) params.set('q', state.q);
    if (state.category) params.set('category', state.category);
    $('catalog-status').textContent = 'Loading…';
    showError($('catalog-error'), null);
    try {
      const page = await api('GET', `api/catalog/products?${params}`);
      if (seq !== state.productsSeq) return; // a newer list is on its way
      state.total = page.total;
      renderProducts(page.products);
      const from = page.total === 0 ? 0 : page.offset + 1;
      const to = page.offset + page.products.length;
      $('catalog-status').textContent = page.total === 0 ? 'No products match.' : '';
      $('page-info').textContent = page.total === 0 ? '' : `${from}–${to} of ${page.total}`;
      $('prev').disabled = page.offset === 0;
      $('next').disabled = to >= page.total;
    } catch (err) {
      if (seq !== state.productsSeq) return;
      $('catalog-status').textContent = '';
      renderProducts([]);
      showError($('catalog-error'), err);
    }
  }

  function renderProducts(products) {
    const list = $('products');
    list.replaceChildren();
    const template = $('product-card');
    for (const p of products) {
      const card = template.content.firstElementChild.cloneNode(true);
      const img = card.querySelector('.thumb');
      if (p.image) {
        img.src = p.image;
        img.alt = p.name;
      } else {
        img.remove();
      }
      card.querySelector('.name').textContent = p.name;
      card.querySelector('.desc').textContent = p.description;
      card.querySelector('.price').textContent = money(p.price_cents, p.currency);
      const stock = card.querySelector('.stock');
      const qty = card.querySelector('.qty');
      const add = card.querySelector('.add-btn');
      if (p.stock > 0) {
        stock.textContent = `${p.stock} in stock`;
        qty.max = String(Math.min(p.stock, 1000));
      } else {
        stock.textContent = 'Out of stock';
        stock.classList.add('out');
        qty.disabled = true;
        add.disabled = true;
      }
      add.addEventListener('click', () => {
        const n = Number.parseInt(qty.value, 10);
        addToBasket(p, Number.isFinite(n) && n > 0 ? n : 1);
      });
      setUpReviews(card, p);
      list.append(card);
    }
  }

  // ---- Reviews ------------------------------------------------------------

  /**
   * A product's reviews, loaded when its card's "Reviews" is opened (the
   * gateway keeps them a while); a signed-in user may post one, and reads
   * it back at once (posting drops the gateway's kept list).
   */
  function setUpReviews(card, product) {
    const box = card.querySelector('.reviews');
    const form = box.querySelector('.review-form');
    const error = box.querySelector('.review-error');
    box.addEventListener('toggle', () => {
      if (!box.open) return;
      form.hidden = !auth.signedIn;
      box.querySelector('.review-hint').hidden = auth.signedIn;
      loadReviews(box, product.id);
    });
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      showError(error, null);
      const submit = form.querySelector('.review-submit');
      submit.disabled = true;
      try {
        const review = {
          author: form.querySelector('.review-author').value,
          rating: Number.parseInt(form.querySelector('.review-rating').value, 10),
          text: form.querySelector('.review-text').value,
        };
        await api('POST', `api/reviews/${encodeURIComponent(product.id)}`, review, { auth: true });
        form.querySelector('.review-text').value = '';
        await loadReviews(box, product.id);
      } catch (err) {
        showError(error, err);
      } finally {
        submit.disabled = false;
      }
    });
  }

  async function loadReviews(box, id) {
    const summary = box.querySelector('.reviews-summary');
    const list = box.querySelector('.review-list');
    summary.textContent = 'Loading…';
    try {
      const page = await api('GET', `api/reviews/${encodeURIComponent(id)}`);
      const plural = page.count === 1 ? '' : 's';
      summary.textContent = page.count === 0
        ? 'No reviews yet.'
        : `${page.average_rating} of 5 from ${page.count} review${plural}`;
      // Newest first; all text, never markup.
      list.replaceChildren(...page.reviews.slice().reverse().map((r) => el('li', {},
        el('span', { className: 'stars' }, '★'.repeat(r.rating)), ` ${r.author}: `, r.text)));
    } catch (err) {
      summary.textContent = '';
      showError(box.querySelector('.review-error'), err);
    }
  }

  // ---- Basket -------------------------------------------------------------

  function loadBasket() {
    try {
      const saved = JSON.parse(localStorage.getItem(BASKET_KEY) || '[]');
      return Array.isArray(saved) ? saved.filter((l) => l && typeof l.sku === 'string') : [];
    } catch (_) {
      return [];
    }
  }

  function saveBasket() {
    try {
      localStorage.setItem(BASKET_KEY, JSON.stringify(state.basket));
    } catch (_) {
      // Private mode or full storage: the basket just won't survive a reload.
    }
  }

  function addToBasket(product, quantity) {
    const line = state.basket.find((l) => l.sku === product.id);
    if (line) {
      line.quantity = Math.min(line.quantity + quantity, 1000);
    } else {
      state.basket.push({
        sku: product.id,
        name: product.name,
        unit_price_cents: product.price_cents,
        currency: product.currency,
        stock: product.stock,
        quantity: Math.min(quantity, 1000),
      });
    }
    basketChanged();
  }

  function setQuantity(sku, quantity) {
    const line = state.basket.find((l) => l.sku === sku);
    if (!line) return;
    if (!Number.isFinite(quantity) || quantity < 1) {
      state.basket = state.basket.filter((l) => l.sku !== sku);
    } else {
      line.quantity = Math.min(quantity, 1000);
    }
    basketChanged();
  }

  function basketChanged() {
    saveBasket();
    showOk($('order-ok'), null);
    renderBasket();
    scheduleQuote();
  }

  function renderBasket() {
    const body = $('basket-lines');
    body.replaceChildren();
    const empty = state.basket.length === 0;
    $('basket-empty').hidden = !empty;
    $('basket-table').hidden = empty;
    const quoted = new Map();
    if (quoteIsCurrent()) for (const l of state.quote.lines) quoted.set(l.sku, l);
    for (const line of state.basket) {
      const q = quoted.get(line.sku);
      const qty = el('input', { type: 'number', min: '0', max: '1000', value: String(line.quantity) });
      qty.setAttribute('aria-label', `Quantity of ${line.name}`);
      qty.addEventListener('change', () => setQuantity(line.sku, Number.parseInt(qty.value, 10)));
      const remove = el('button', { type: 'button', className: 'link', title: `Remove ${line.name}` }, '✕');
      remove.addEventListener('click', () => setQuantity(line.sku, 0));
      const totalCell = el('td', { className: 'num' });
      if (q) {
        totalCell.append(money(q.line_total_cents, line.currency));
        if (q.discount_cents > 0) {
          totalCell.append(el('span', { className: 'line-discount' }, `−${money(q.discount_cents, line.currency)}`));
        }
      } else {
        totalCell.append(money(line.unit_price_cents * line.quantity, line.currency));
      }
      body.append(
        el('tr', {},
          el('td', {}, line.name),
          el('td', {}, qty),
          totalCell,
          el('td', {}, remove)),
      );
    }
    updatePlaceButton();
  }

  // ---- Quote --------------------------------------------------------------

  function scheduleQuote() {
    clearTimeout(state.quoteTimer);
    state.quoteTimer = setTimeout(requestQuote, QUOTE_DELAY_MS);
  }

  /** The quote request for the basket and coupon as they are now; null
   * for an empty basket. */
  function quoteRequest() {
    if (state.basket.length === 0) return null;
    const body = {
      items: state.basket.map((l) => ({ sku: l.sku, quantity: l.quantity, unit_price_cents: l.unit_price_cents })),
      currency: state.basket[0].currency || 'EUR',
    };
    const coupon = $('coupon').value.trim();
    if (coupon) body.coupon = coupon;
    return body;
  }

  /** Whether state.quote is of the basket and coupon as they are now:
   * after a change it is not, until the next quote comes back. */
  function quoteIsCurrent() {
    const body = quoteRequest();
    return Boolean(state.quote && body && state.quotedFor === JSON.stringify(body));
  }

  async function requestQuote() {
    const seq = ++state.quoteSeq;
    showError($('quote-error'), null);
    const body = quoteRequest();
    if (!body) {
      state.quote = null;
      state.quotedFor = null;
      renderQuote();
      return;
    }
    try {
      const quote = await api('POST', 'api/pricing/quote', body);
      if (seq !== state.quoteSeq) return; // a newer quote is on its way
      state.quote = quote;
      state.quotedFor = JSON.stringify(body);
    } catch (err) {
      if (seq !== state.quoteSeq) return;
      state.quote = null;
      state.quotedFor = null;
      showError($('quote-error'), err);
    }
    renderQuote();
  }

  function renderQuote() {
    const q = state.quote;
    $('quote').hidden = !q;
    if (q) {
      $('q-subtotal').textContent = money(q.subtotal_cents, q.currency);
      $('q-discount').textContent = q.discount_cents > 0 ? `−${money(q.discount_cents, q.currency)}` : money(0, q.currency);
      $('q-tax').textContent = money(q.tax_cents, q.currency);
      $('q-total').textContent = money(q.total_cents, q.currency);
      const list = $('q-discounts');
      list.replaceChildren();
      for (const d of q.discounts || []) {
        list.append(el('li', {}, `${d.description}: −${money(d.amount_cents, q.currency)}`));
      }
    }
    renderBasket();
  }

  // ---- Orders -------------------------------------------------------------

  /** Place order waits for the quote of the basket and coupon as they are
   * (within the quote's delay after a change, or while it is asked for):
   * an earlier one's total would be refused as price_changed. */
  function updatePlaceButton() {
    $('place').disabled = state.placing || !quoteIsCurrent();
  }

  async function placeOrder(event) {
    event.preventDefault();
    if (!quoteIsCurrent() || state.placing) return;
    if (!auth.signedIn) {
      showError($('order-error'), new ApiError(401, 'unauthenticated', 'Sign in to place an order.'));
      return;
    }
    const body = {
      items: state.basket.map((l) => ({ sku: l.sku, quantity: l.quantity })),
      expected_total_cents: state.quote.total_cents,
    };
    const coupon = $('coupon').value.trim();
    if (coupon) body.coupon = coupon;
    // A simulated test card: orders passes it to payments and keeps only
    // its last four digits.
    body.payment = { card: $('card').value.trim() };

    // The same order tried again keeps its key: if the first try placed
    // it and only the answer was lost, orders answers with that order.
    const sent = JSON.stringify(body);
    if (!state.checkout || state.checkout.body !== sent) {
      state.checkout = { body: sent, key: newKey() };
    }

    state.placing = true;
    updatePlaceButton();
    showError($('order-error'), null);
    showOk($('order-ok'), null);
    try {
      const order = await api('POST', 'api/orders', body, {
        auth: true,
        headers: { 'Idempotency-Key': state.checkout.key },
      });
      state.checkout = null;
      state.basket = [];
      state.quote = null;
      state.quotedFor = null;
      saveBasket();
      renderQuote();
      showOk($('order-ok'), `Thank you! Order ${order.id.slice(0, 8)} is placed: ${money(order.total_cents, order.currency)}. Checking stock and payment…`);
      trackOrder(order);
      loadOrders();
    } catch (err) {
      showError($('order-error'), err);
      if (err.code === 'price_changed' || err.code === 'insufficient_stock') {
        await refreshBasketFromCatalog();
      }
    } finally {
      state.placing = false;
      updatePlaceButton();
    }
  }

  /** A random idempotency key (a v4 UUID): `crypto.randomUUID` is only
   * there on https and localhost, `getRandomValues` everywhere. */
  function newKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  /** Re-reads every basket line from the catalog, all at once, then
   * re-quotes. Without their reviews: the catalog would ask the reviews
   * service for each line's, and wait for them up to 1.5 s. */
  async function refreshBasketFromCatalog() {
    await Promise.all(state.basket.map(async (line) => {
      try {
        const p = await api('GET', `api/catalog/products/${encodeURIComponent(line.sku)}?reviews=false`);
        line.unit_price_cents = p.price_cents;
        line.currency = p.currency;
        line.stock = p.stock;
        line.name = p.name;
      } catch (_) {
        // Left as is: placing the order again reports what is wrong.
      }
    }));
    saveBasket();
    renderBasket();
    await requestQuote();
  }

  function rememberEmail(email) {
    try {
      localStorage.setItem(EMAIL_KEY, email);
    } catch (_) {
      // Not remembered; nothing else depends on it.
    }
  }

  async function loadOrders() {
    showError($('orders-error'), null);
    const url = 'api/orders'; // the token says whose
    if (!auth.signedIn) {
      showError($('orders-error'), new ApiError(401, 'unauthenticated', 'Sign in to see your orders.'));
      return;
    }
    const list = $('orders');
    try {
      const data = await api('GET', url, undefined, { auth: true });
      list.replaceChildren();
      $('orders-empty').hidden = data.orders.length > 0;
      for (const o of data.orders) list.append(renderOrder(o));
    } catch (err) {
      list.replaceChildren();
      $('orders-empty').hidden = true;
      showError($('orders-error'), err);
    }
  }

  // ---- Following an order through the saga ---------------------------------

  const REASONS = {
    out_of_stock: 'out of stock',
    payment_declined: 'payment declined',
    timed_out: 'not completed in time',
  };

  function statusText(o) {
    if (o.status === 'cancelled' && o.reason) return `cancelled: ${REASONS[o.reason] || o.reason}`;
    return o.status;
  }

  function renderProgress(o) {
    $('progress').hidden = false;
    $('progress-id').textContent = `Order ${o.id.slice(0, 8)}`;
    const badge = $('progress-status');
    badge.textContent = statusText(o);
    badge.className = `badge ${o.status}`;
    const steps = $('progress-steps');
    steps.replaceChildren();
    for (const step of o.history || []) {
      const at = new Date(step.at);
      const when = Number.isNaN(at.getTime()) ? step.at : at.toLocaleTimeString();
      steps.append(el('li', {}, `${when} — ${statusText(step)}`));
    }
    if (o.status === 'placed') steps.append(el('li', { className: 'muted' }, 'waiting for stock and payment…'));
  }

  function stopTracking() {
    state.tracking = null;
  }

  /**
   * Polls the order every TRACK_EVERY_MS until the saga ends it (confirmed
   * or cancelled), showing each step. Placing another order, or signing
   * out, stops following this one.
   */
  async function trackOrder(order) {
    const id = order.id;
    state.tracking = id;
    renderProgress(order);
    const until = Date.now() + TRACK_FOR_MS;
    let failures = 0;
    while (state.tracking === id && Date.now() < until) {
      await new Promise((resolve) => setTimeout(resolve, TRACK_EVERY_MS));
      if (state.tracking !== id) return;
      try {
        const o = await api('GET', `api/orders/${encodeURIComponent(id)}`, undefined, { auth: true });
        failures = 0;
        renderProgress(o);
        if (o.status !== 'placed') {
          stopTracking();
          const ended = o.status === 'confirmed'
            ? `Order ${id.slice(0, 8)} is confirmed: ${money(o.total_cents, o.currency)}. Thank you!`
            : null;
          showOk($('order-ok'), ended);
          if (!ended) showError($('order-error'), new ApiError(409, o.reason || 'cancelled', `Order ${id.slice(0, 8)} was ${statusText(o)}.`));
          loadOrders();
          // The notification and the sales figures follow by events of
          // their own; give them a moment.
          setTimeout(loadNotifications, 1000);
          setTimeout(loadSales, 2000);
          return;
        }
      } catch (err) {
        failures += 1;
        if (failures >= 5) {
          showError($('order-error'), err);
          stopTracking();
          return;
        }
      }
    }
    if (state.tracking === id) {
      stopTracking();
      showOk($('order-ok'), `Order ${id.slice(0, 8)} is still being processed; "My orders" will show how it ends.`);
    }
  }

  // ---- Notifications and sales --------------------------------------------

  async function loadNotifications() {
    showError($('notifications-error'), null);
    const list = $('notifications');
    if (!auth.signedIn) {
      list.replaceChildren();
      $('notifications-empty').hidden = true;
      return;
    }
    try {
      const data = await api('GET', 'api/notifications?limit=20', undefined, { auth: true });
      list.replaceChildren();
      $('notifications-empty').hidden = data.notifications.length > 0;
      for (const n of data.notifications) {
        const at = new Date(n.created_at);
        list.append(el('li', {},
          el('time', { dateTime: n.created_at }, Number.isNaN(at.getTime()) ? n.created_at : at.toLocaleString()),
          n.message));
      }
    } catch (err) {
      list.replaceChildren();
      $('notifications-empty').hidden = true;
      showError($('notifications-error'), err);
    }
  }

  async function loadSales() {
    showError($('sales-error'), null);
    try {
      const data = await api('GET', 'api/analytics/sales');
      const rows = $('sales-lines');
      rows.replaceChildren();
      for (const p of data.products.slice(0, 10)) {
        rows.append(el('tr', {},
          el('td', {}, p.sku.replace(/^sku-/, '')),
          el('td', { className: 'num' }, p.units),
          el('td', { className: 'num' }, money(p.revenue_cents, p.currency))));
      }
      $('sales-table').hidden = data.products.length === 0;
      $('sales-empty').hidden = data.products.length > 0;
    } catch (err) {
      $('sales-table').hidden = true;
      $('sales-empty').hidden = true;
      showError($('sales-error'), err);
    }
  }

  function renderOrder(o) {
    const when = new Date(o.created_at);
    const lines = el('ul');
    for (const l of o.lines) {
      lines.append(el('li', {}, `${l.quantity} × ${l.name} — ${money(l.line_total_cents, o.currency)}`));
    }
    const extra = [];
    if (o.discount_cents > 0) extra.push(`discounts −${money(o.discount_cents, o.currency)}`);
    extra.push(`VAT ${money(o.tax_cents, o.currency)}`);
    if (o.coupon) extra.push(`coupon ${o.coupon}`);
    return el('li', { className: 'order' },
      el('header', {},
        el('strong', {}, Number.isNaN(when.getTime()) ? o.created_at : when.toLocaleString()),
        el('strong', {}, money(o.total_cents, o.currency))),
      el('div', { className: 'id' }, `${o.id} `, el('span', { className: `badge ${o.status}` }, statusText(o))),
      lines,
      el('div', { className: 'muted' }, extra.join(' · ')));
  }

  // ---- Wiring -------------------------------------------------------------

  function init() {
    $('search').addEventListener('submit', (event) => {
      event.preventDefault();
      state.q = $('q').value.trim();
      state.category = $('category').value;
      state.offset = 0;
      loadProducts();
    });
    $('category').addEventListener('change', () => {
      state.category = $('category').value;
      state.offset = 0;
      loadProducts();
    });
    $('prev').addEventListener('click', () => {
      state.offset = Math.max(0, state.offset - PAGE_SIZE);
      loadProducts();
    });
    $('next').addEventListener('click', () => {
      state.offset += PAGE_SIZE;
      loadProducts();
    });
    $('coupon').addEventListener('input', () => {
      updatePlaceButton(); // the quote is of the coupon before this change
      scheduleQuote();
    });
    $('checkout').addEventListener('submit', placeOrder);
    $('refresh-orders').addEventListener('click', loadOrders);
    $('refresh-notifications').addEventListener('click', loadNotifications);
    $('refresh-sales').addEventListener('click', loadSales);
    $('tab-sign-in').addEventListener('click', () => showTab('sign-in'));
    $('tab-sign-up').addEventListener('click', () => showTab('sign-up'));
    $('sign-in').addEventListener('submit', signIn);
    $('sign-up').addEventListener('submit', signUp);
    $('sign-out').addEventListener('click', signOut);

    try {
      const remembered = localStorage.getItem(EMAIL_KEY) || '';
      $('email').value = remembered;
      $('si-email').value = remembered;
    } catch (_) {
      // No storage: start empty.
    }
    renderAccount();
    try {
      sessionStorage.removeItem(OLD_REFRESH_KEY);
    } catch (_) {
      // No storage: nothing was kept there either.
    }
    // A reload keeps the session: its cookies are still there, and an
    // expired access token is refreshed on the first refusal.
    if (sessionExpiry() !== null) startSession();
    renderBasket();
    scheduleQuote();
    loadCategories();
    loadProducts();
    loadSales();
  }

  init();
})();
