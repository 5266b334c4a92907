// The keys the console holds. They live in sessionStorage only: never in a URL, never in
// localStorage, so they are gone when the tab closes or the user signs out.

const ADMIN_KEY = "llmgate.adminKey";
const PLAYGROUND_KEY = "llmgate.playgroundKey";

export const adminKey = () => sessionStorage.getItem(ADMIN_KEY);
export const rememberAdminKey = (key) => sessionStorage.setItem(ADMIN_KEY, key);

export const playgroundKey = () => sessionStorage.getItem(PLAYGROUND_KEY);
export const rememberPlaygroundKey = (key) => sessionStorage.setItem(PLAYGROUND_KEY, key);

export function forgetKeys() {
  sessionStorage.removeItem(ADMIN_KEY);
  sessionStorage.removeItem(PLAYGROUND_KEY);
}
