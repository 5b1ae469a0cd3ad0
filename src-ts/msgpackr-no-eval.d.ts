// msgpackr's pure-JS build (see codecs.ts) has the API of the main entry but ships no types.
declare module 'msgpackr/index-no-eval' {
  export { Packr } from 'msgpackr'
}
