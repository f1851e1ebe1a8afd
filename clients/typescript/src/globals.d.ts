// The few host APIs the library uses that every target (browsers, Node.js
// >= 18, React Native) provides, declared here so the package compiles
// without the DOM or Node.js type libraries.
declare function setTimeout(handler: () => void, ms?: number): unknown;
declare function clearTimeout(handle: unknown): void;
declare function setInterval(handler: () => void, ms?: number): unknown;
declare function clearInterval(handle: unknown): void;
declare const console: { warn(...args: unknown[]): void };
