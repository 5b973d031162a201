// Landing page: two names in, two call links out.
import { ID_PATTERN } from '/switchboard.js';

const $ = (id) => document.getElementById(id);
const nameA = $('name_a');
const nameB = $('name_b');
const error = $('names_error');
const links = $('links');
// A token on the landing page's URL (signed links) is carried into the call links.
const token = new URLSearchParams(location.search).get('token');

const WORDS = ['amber', 'brisk', 'cedar', 'delta', 'ember', 'fjord', 'gale', 'harbor', 'iris', 'juniper',
  'kestrel', 'lumen', 'maple', 'nova', 'onyx', 'pine', 'quartz', 'river', 'sable', 'tide', 'umber',
  'vale', 'willow', 'xenon', 'yarrow', 'zephyr'];

function randomName() {
  const n = new Uint32Array(2);
  crypto.getRandomValues(n);
  return `${WORDS[n[0] % WORDS.length]}-${(n[1] % 9000) + 1000}`;
}

function callLink(userID, peerID) {
  const url = new URL('/call', location.href);
  url.searchParams.set('userID', userID);
  url.searchParams.set('peerID', peerID);
  if (token) url.searchParams.set('token', token);
  return url.toString();
}

function update() {
  const a = nameA.value.trim();
  const b = nameB.value.trim();
  let problem = '';
  if (!a || !b) problem = '';
  else if (!ID_PATTERN.test(a) || !ID_PATTERN.test(b)) problem = 'Names may only use letters, digits, “_”, “.” or “-” (at most 64).';
  else if (a === b) problem = 'The two names must differ.';
  error.textContent = problem;
  error.hidden = !problem;
  const ok = a && b && !problem;
  links.hidden = !ok;
  if (!ok) return;
  const la = callLink(a, b);
  const lb = callLink(b, a);
  $('who_a').textContent = a;
  $('who_b').textContent = b;
  $('link_a').value = la;
  $('link_b').value = lb;
  $('open_a').href = la;
  $('open_b').href = lb;
}

async function copy(button) {
  const input = $(button.dataset.target);
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    // Clipboard API unavailable (e.g. plain http on another host): select for a manual copy.
    input.select();
    document.execCommand?.('copy');
  }
  const old = button.textContent;
  button.textContent = 'Copied';
  setTimeout(() => (button.textContent = old), 1500);
}

$('generate').addEventListener('click', () => {
  nameA.value = randomName();
  do nameB.value = randomName(); while (nameB.value === nameA.value);
  update();
});
nameA.addEventListener('input', update);
nameB.addEventListener('input', update);
$('names').addEventListener('submit', (e) => e.preventDefault());
for (const b of document.querySelectorAll('button.copy')) b.addEventListener('click', () => copy(b));
update();
